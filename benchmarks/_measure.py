"""Peak memory and median time of one benchmark step, on CPU or CUDA (shared by the scripts here).

Peak memory is the largest number of bytes allocated above what was live before the step: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocator's running total as recorded by
``torch.profiler`` (profile_memory=True), i.e. every allocation and free the CPU allocator saw,
including autograd's saved tensors. Time is measured in separate runs, without the profiler:
CUDA events on the GPU, ``time.perf_counter`` on the CPU, the median of the timed runs. On the CPU
each timed run also records the process's resource usage (``getrusage``): user and system CPU
seconds, minor page faults and the growth of peak RSS. ``matmul_gflops`` measures the machine's
dense matmul rate, the yardstick for a model's achieved GFLOP/s.

Import it as ``benchmarks._measure`` with the repository root on ``sys.path`` (``benchmarks`` is
a namespace package, not part of the installed distribution).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

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
            times.append(step_usage(step).wall_s)
    return statistics.median(times)


def _maxrss_mib(usage: resource.struct_rusage) -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**20


def peak_rss_mib() -> float:
    """The process's peak resident set so far (its high-water mark), MiB."""
    return _maxrss_mib(resource.getrusage(resource.RUSAGE_SELF))


@dataclass(frozen=True)
class StepUsage:
    """What one call cost the process (``getrusage(RUSAGE_SELF)`` deltas, every thread)."""

    wall_s: float
    user_s: float  # CPU seconds in user mode, summed over threads (intra-op threads included)
    system_s: float  # CPU seconds in the kernel: page faults, allocation (mmap/munmap), ...
    minor_faults: int  # page faults served without I/O: mostly first touches of fresh memory
    peak_rss_growth_mib: float  # rise of the process's peak resident set (0 once it is reached)
    wall_s_runs: tuple[float, ...] = ()  # every call's wall time, for the spread of a median

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "wall_s": self.wall_s,
            "user_s": self.user_s,
            "system_s": self.system_s,
            "minor_faults": self.minor_faults,
            "peak_rss_growth_mib": self.peak_rss_growth_mib,
            "wall_s_runs": list(self.wall_s_runs),
        }


def step_usage(step: Callable[[], object]) -> StepUsage:
    """Wall time and resource usage of one call of ``step`` (CPU work; no device sync)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return StepUsage(
        wall_s=wall,
        user_s=after.ru_utime - before.ru_utime,
        system_s=after.ru_stime - before.ru_stime,
        minor_faults=after.ru_minflt - before.ru_minflt,
        peak_rss_growth_mib=_maxrss_mib(after) - _maxrss_mib(before),
    )


def median_usage(step: Callable[[], object], repeats: int) -> StepUsage:
    """Field by field median of ``repeats`` calls' ``step_usage`` (CPU only: no device sync).

    Peak RSS growth is the sum instead: the high-water mark rises at most once per new peak, so
    the total over the calls is what they grew it by.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = [step_usage(step) for _ in range(repeats)]
    return StepUsage(
        wall_s=statistics.median(r.wall_s for r in runs),
        user_s=statistics.median(r.user_s for r in runs),
        system_s=statistics.median(r.system_s for r in runs),
        minor_faults=int(statistics.median(r.minor_faults for r in runs)),
        peak_rss_growth_mib=sum(r.peak_rss_growth_mib for r in runs),
        wall_s_runs=tuple(r.wall_s for r in runs),
    )


def matmul_gflops(
    n: int, repeats: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """The machine's dense matmul rate: 2 n^3 FLOPs over the median time of an [n, n] @ [n, n]
    product (one untimed call first), with the current intra-op thread count on the CPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats, warmup=1)
    return 2 * n**3 / seconds / 1e9


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
