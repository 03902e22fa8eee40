"""Keep freed memory in the process: glibc malloc settings applied at process start.

A CPU training step allocates and frees tens of GiB of large tensors (activations, their
gradients, temporaries). With glibc's defaults every allocation above the mmap threshold (128 KiB,
raised dynamically up to 32 MiB) is a fresh ``mmap`` whose pages the kernel zero-fills on first
touch, and ``free`` hands it straight back: a Mamba-2 step at 8K tokens faulted in ~40 GiB this
way (10M minor faults, 26-32 CPU-seconds in the kernel). Fresh pages fill at ~4.5 GiB/s on the
2-core test machine against ~25 GiB/s for reused ones. Serving large blocks from the heap and
never trimming it makes the second and later steps reuse the first step's pages: measured 1.54x
on Hydra-29m at 16K and 2.27x on Mamba-2-29m at 8K (issue 18), bitwise the same losses.

``HYDRA_MALLOC`` selects the policy: ``retain`` (default) or ``system`` (leave glibc's defaults).
The call is a logged no-op where it cannot apply: not Linux/glibc, another allocator preloaded
(jemalloc, tcmalloc, mimalloc), or ``GLIBC_TUNABLES`` already setting ``glibc.malloc.*`` (the
user's own settings win). See docs/performance.md.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

ENV = "HYDRA_MALLOC"
POLICIES = ("retain", "system")

# mallopt parameter numbers (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

# What ``retain`` sets, and why:
# - M_MMAP_MAX = 0: no allocation is served by its own mmap, so freeing one never unmaps pages
#   the next step would fault in again; large blocks come from the heap (glibc still falls back
#   to mmap if the heap cannot grow).
# - M_TRIM_THRESHOLD = -1: never give the top of the heap back to the kernel (mallopt(3): "-1
#   disables trimming completely"). Any finite value that fits mallopt's int (< 2 GiB) is below
#   what a step frees at once (GiBs), so the heap would be trimmed and refaulted every step.
# - M_TOP_PAD = 256 MiB: grow the heap in big steps, a few brk calls per step instead of one per
#   new large tensor; only virtual until touched, so it costs no resident memory by itself.
RETAIN_SETTINGS: dict[str, tuple[int, int]] = {
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
    "M_TOP_PAD": (M_TOP_PAD, 256 * 2**20),
}
# The same as GLIBC_TUNABLES, for launch paths that start no Python entry point of ours
TUNABLES_EQUIVALENT = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"
    ":glibc.malloc.top_pad=268435456"
)
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MallocPolicy:
    """What ``apply_malloc_policy`` did: ``applied`` is True when glibc took every setting."""

    policy: str
    applied: bool
    reason: str

    def describe(self) -> str:
        """One log line."""
        if self.applied:
            return f"malloc policy {self.policy!r} applied: {self.reason} ({ENV}=system: off)"
        return f"malloc policy {self.policy!r} not applied: {self.reason}"


_result: MallocPolicy | None = None


def apply_malloc_policy(environ: dict[str, str] | None = None) -> MallocPolicy:
    """Apply the process's malloc policy once (later calls return the first outcome).

    Call it first thing in an entry point, before large allocations: it changes how later
    allocations are served and what ``free`` returns to the kernel.

    Args:
        environ: the environment to read ``HYDRA_MALLOC``, ``LD_PRELOAD`` and ``GLIBC_TUNABLES``
            from (default ``os.environ``).

    Returns:
        The outcome; ``describe()`` gives its log line (logged here at DEBUG).

    Raises:
        ValueError: ``HYDRA_MALLOC`` is neither ``retain`` nor ``system``.
    """
    global _result
    if _result is None:
        _result = _decide(os.environ if environ is None else environ)
        # DEBUG here: logging is rarely set up this early, and a rejected command line must
        # print its one error line only; the trainer logs the outcome (``log_malloc_policy``)
        log.debug(_result.describe())
    return _result


def log_malloc_policy() -> None:
    """Log the outcome at INFO (the trainer's build does, once logging is set up)."""
    if _result is not None:
        log.info(_result.describe())


def _decide(environ: dict[str, str]) -> MallocPolicy:
    policy = environ.get(ENV, "retain").strip().lower() or "retain"
    if policy not in POLICIES:
        raise ValueError(f"{ENV}={environ[ENV]!r}: expected one of {', '.join(POLICIES)}")
    if policy == "system":
        return MallocPolicy(policy, False, f"{ENV}=system, the C library's defaults are kept")
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return MallocPolicy(policy, False, f"not glibc ({sys.platform}), the system allocator runs")
    preload = environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other is not None:
        return MallocPolicy(policy, False, f"{other} is preloaded and manages memory itself")
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return MallocPolicy(policy, False, "GLIBC_TUNABLES sets glibc.malloc.*, which wins")
    return _mallopt_all(libc, policy)


def _mallopt_all(libc: ctypes.CDLL, policy: str) -> MallocPolicy:
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    failed = [
        name for name, (param, value) in RETAIN_SETTINGS.items() if mallopt(param, value) != 1
    ]
    if failed:
        return MallocPolicy(policy, False, f"mallopt refused {', '.join(failed)}")
    settings = ", ".join(f"{name}={value}" for name, (_, value) in RETAIN_SETTINGS.items())
    return MallocPolicy(policy, True, f"freed memory stays in the process ({settings})")
