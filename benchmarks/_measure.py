"""Peak memory and median time of one benchmark step, on CPU or CUDA (shared by the scripts here).

Peak memory is the largest number of bytes allocated above what was live before the step: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocator's running total as recorded by
``torch.profiler`` (profile_memory=True), i.e. every allocation and free the CPU allocator saw,
including autograd's saved tensors. Time is measured in separate runs, without the profiler:
CUDA events on the GPU, ``time.perf_counter`` on the CPU, the median of the timed runs.

Import it as ``benchmarks._measure`` with the repository root on ``sys.path`` (``benchmarks`` is
a namespace package, not part of the installed distribution).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(step: Callable[[], object], device: torch.device | str) -> int:
    """Largest bytes allocated above the level live before ``step`` runs.

    Args:
        step: the work to measure, called once.
        device: where it runs; on CPU the call runs under ``torch.profiler`` (slower).

    Returns:
        Peak bytes above the starting level (0 if nothing was allocated).
    """
    if torch.device(device).type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # total_allocated: the allocator's running total since the profiler started, after each event
    totals = [0]
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            totals.append(node.extra_fields.total_allocated)
        stack.extend(node.children)
    return max(totals)


def median_seconds(
    step: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1
) -> float:
    """Median seconds of ``repeats`` timed calls of ``step`` after ``warmup`` untimed ones.

    The median, not the mean, so that one run slowed by a busy machine does not move the figure.

    Args:
        step: the work to time.
        device: where it runs (CUDA: events around each call, after a synchronise).
        repeats: timed calls, >= 1.
        warmup: untimed calls first (compilation, autotuning, allocator warm-up).

    Returns:
        The median time of one call, in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        step()
    on_cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        sync(device)
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class LargestTensor(TorchDispatchMode):
    """While active: the most elements and the most bytes of any tensor an op returns (a
    DTensor counts its local part), e.g. to show that no rank ever holds a whole table."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                local = t.to_local() if isinstance(t, DTensor) else t
                self.numel = max(self.numel, local.numel())
                self.nbytes = max(self.nbytes, local.numel() * local.element_size())
        return out
