"""Run a function on N gloo ranks in spawned processes on this machine (CPU tests, benchmarks)."""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.dist import exit_process

_TIMEOUT_S = 300


def _entry(rank: int, world: int, init_file: str, fn: Callable, args: tuple, errors: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # a collective that never pairs up fails the test in minutes instead of hanging it
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=_TIMEOUT_S),
    )
    try:
        fn(rank, world, *args)
        # no rank tears its connections down while another still talks to it: gloo aborts the
        # other process ("terminate called without an active exception") if one exits early
        dist.barrier()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    # the same exit as a launched rank's (``exit_process``): a finished rank must not abort in
    # interpreter finalization, which the parent would report as a failed rank
    exit_process(0)


def run_on_ranks(world: int, fn: Callable, *args: Any) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; raises with the first rank's traceback.

    ``fn`` must be importable (a module-level function) for the spawn start method.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.start_processes(
                _entry,
                args=(world, init_file, fn, args, errors),
                nprocs=world,
                start_method="spawn",
            )
        except mp.ProcessRaisedException as err:
            message = errors.get() if not errors.empty() else str(err)
            raise AssertionError(message) from None
