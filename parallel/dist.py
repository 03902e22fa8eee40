"""Process-group setup from the standard launcher environment (torchrun, deepspeed, SLURM).

With no launcher variables everything degrades to one process and no process group.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist

from parallel.rendezvous import generation_store, uses_agent_store

if TYPE_CHECKING:
    from parallel.mesh import ParallelMesh


@dataclass
class DistInfo:
    """Who this process is. ``dp_rank``/``dp_world`` are the data-parallel coordinates that the
    data reader shards by; they come from the device mesh (``with_mesh``) and differ from
    rank/world once context parallelism puts several ranks on one sample (-1: rank/world)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0  # how long a collective may wait (parallel.timeout_s, resolved)
    dp_rank: int = -1
    dp_world: int = -1

    def __post_init__(self) -> None:
        if self.dp_rank < 0:
            self.dp_rank = self.rank
        if self.dp_world < 0:
            self.dp_world = self.world_size

    def with_mesh(self, mesh: ParallelMesh) -> DistInfo:
        """This process's info with the data-parallel coordinates of ``mesh``."""
        return dataclasses.replace(self, dp_rank=mesh.dp_rank, dp_world=mesh.dims.dp_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launcher_rank() -> int:
    """RANK from the launcher's environment (0 without a launcher), before any init."""
    return _env_int("RANK", 0)


def launcher_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 without a launcher), before any init."""
    return _env_int("WORLD_SIZE", 1)


CPU_TIMEOUT_S = 60  # gloo on CPU: a hang is found in a minute (tests, drills, CPU runs)
GPU_TIMEOUT_S = 600  # NCCL: first-step compilation and large checkpoints take minutes


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK and start the process group (nccl on CUDA, else gloo).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``.
        timeout_s: collectives that hang longer fail with an error instead of waiting forever,
            in every group (the device mesh's too); None: ``CPU_TIMEOUT_S`` or ``GPU_TIMEOUT_S``.
    """
    rank, world = launcher_rank(), launcher_world_size()
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if timeout_s is None:
        timeout_s = GPU_TIMEOUT_S if use_cuda else CPU_TIMEOUT_S
    if world > 1 and not dist.is_initialized():
        # groups made later (the device mesh's) take torch's 30-minute default otherwise
        dist.distributed_c10d.default_pg_timeout = datetime.timedelta(seconds=timeout_s)
        # under torchrun, a key space of this start's own, so a restart never meets the dead
        # attempt's addresses (parallel/rendezvous.py); other launchers start a fresh store
        store = generation_store(rank, world, timeout_s) if uses_agent_store() else None
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
            store=store,
            rank=rank if store is not None else -1,
            world_size=world if store is not None else -1,
        )
    return DistInfo(
        rank=rank, world_size=world, local_rank=local_rank, device=dev, timeout_s=timeout_s
    )


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The max of ``value`` over ranks (used to agree on stop signals and non-finite losses)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of ``value`` over ranks (for logging)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int | None) -> NoReturn:
    """End this process with ``code``; after a process group, without interpreter finalization.

    A gloo worker thread can hold the last reference to a tensor of a collective that has already
    completed; freeing it takes the GIL (the tensor's Python object is kept alive by C++). If that
    happens while the interpreter finalizes, CPython ends the thread by a forced unwind that
    crosses a ``noexcept`` C++ frame, and a rank that finished everything aborts ("terminate
    called without an active exception", SIGABRT), which torchrun reports as a failed run (seen
    once, in a 4-rank test on a loaded CI machine, after every result was written). So after a
    process group we do the useful part of the exit here, while the interpreter is whole (join
    non-daemon threads, run ``atexit`` handlers, flush logs and streams), and leave with
    ``os._exit``. A process that never started a process group exits the ordinary way.
    """
    code = int(code or 0)
    if launcher_world_size() <= 1:
        sys.exit(code)
    # What Py_Finalize does first: wake executors' idle workers and join non-daemon threads,
    # then the atexit handlers (MLflow's close, which drains the tracker's writer thread).
    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point's ``main`` and end the process through ``exit_process``, also when it
    raises (the traceback is printed first and the code is 1, as Python's own would be)."""
    try:
        code = main()
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
            code = 1
        else:
            code = stop.code
    except BaseException:  # noqa: BLE001 - every failure ends here, with its traceback
        traceback.print_exc()
        code = 1
    exit_process(code)
