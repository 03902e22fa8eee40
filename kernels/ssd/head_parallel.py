"""Run the CPU scan's heads in parallel threads, one intra-op thread each.

Why: a block of the chunked scan (``chunked.py``) is ~40 small ops, ~70 us each on one thread at
hydra-29m's layer shape. PyTorch splits every op over its intra-op threads, and at that size a
parallel region's start, barrier and split of little work cost about what the second thread
saves: on the 2-core test machine the scan took as long on 2 threads as on 1 (issue 18: 20% of a
Hydra step for 6% of its FLOPs). The heads are independent (B and C are shared within a group
and only read), so each thread takes a share of every group's heads for the whole scan, forward
or backward, and runs its ops whole on one core.

Each head's arithmetic is the one the unsplit scan does on it; B's and C's gradients are the sum
of the parts' contributions, added in part order, so results do not depend on thread timing.

Off by default (``HYDRA_SCAN_SPLIT_HEADS=1`` turns it on): measured on the idle 2-core machine,
hydra-29m's layer shape at 8K, fwd+bwd, the split scan took 238-265 ms against 191-207 ms for the
unsplit scan on 2 intra-op threads (the parts' Python and op dispatch contend, so the split runs
at about one thread's speed). With other load on the machine it is the other way round: 357-384
ms split against 1.07-7.3 s unsplit, whose every small op waits at a barrier for a thread the
scheduler has parked. Turn it on where the cores are shared.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


ENV = "HYDRA_SCAN_SPLIT_HEADS"


def split_enabled() -> bool:
    """``HYDRA_SCAN_SPLIT_HEADS=1`` turns the split on (default ``0``: off), checked."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 or 1")
    return value == "1"


def head_parts(heads_per_group: int, device: torch.device) -> int:
    """Parts to split each group's heads into: with the split on (``split_enabled``), on CPU the
    largest count up to the intra-op thread count that divides the heads of a group; else 1 (GPU
    kernels parallelise themselves; one thread has nothing to split)."""
    if device.type != "cpu" or not split_enabled():
        return 1
    for n in range(min(torch.get_num_threads(), heads_per_group), 1, -1):
        if heads_per_group % n == 0:
            return n
    return 1


@dataclass(frozen=True)
class HeadSlice:
    """Part ``index`` of ``parts``: the same share of every one of the ``groups`` groups' heads."""

    groups: int
    parts: int
    index: int

    def __call__(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The part's heads of ``t``, whose dim ``dim`` is the G * R heads (group-major)."""
        per_group = t.shape[dim] // self.groups
        size = per_group // self.parts
        grouped = t.unflatten(dim, (self.groups, per_group))
        return grouped.narrow(dim + 1, self.index * size, size).flatten(dim, dim + 1)


def join_heads(parts: Sequence[torch.Tensor], groups: int, dim: int) -> torch.Tensor:
    """The inverse of ``HeadSlice`` over all parts: each group's heads back in order."""
    grouped = [p.unflatten(dim, (groups, -1)) for p in parts]
    return torch.cat(grouped, dim=dim + 1).flatten(dim, dim + 1)


def sum_in_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ..., left to right, into parts[0] (a fresh tensor of the scan)."""
    total = parts[0]
    for p in parts[1:]:
        total.add_(p)
    return total


def _executor() -> ThreadPoolExecutor:
    """The worker threads, made once per process (a forked child makes its own: the parent's
    threads do not exist there). Workers take the intra-op thread count at their first op,
    which is always 1 (``run_parts``)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="ssd")
        _pool_pid = os.getpid()
    return _pool


def _no_grad(fn: Callable[[int], T], j: int) -> T:
    # a worker thread starts with autograd on, unlike the custom op that called run_parts
    with torch.no_grad():
        return fn(j)


def run_parts(fn: Callable[[int], T], parts: int) -> list[T]:
    """[fn(0), .., fn(parts - 1)], run concurrently (fn(0) on this thread) with one intra-op
    thread each and no autograd (the scan's backward is written by hand); the thread count is
    restored afterwards, also when a part raises."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_executor().submit(_no_grad, fn, j) for j in range(1, parts)]
        try:
            first = _no_grad(fn, 0)
        finally:
            wait(futures)  # no part may still run once the thread count is restored
        return [first, *(f.result() for f in futures)]
    finally:
        torch.set_num_threads(threads)
