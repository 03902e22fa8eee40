"""Build and load the fused CPU kernels (``elementwise.cpp``) once per machine; ctypes bindings.

The library is plain C over raw pointers: no torch headers, so ``g++`` builds it in about a
second, the first time any process needs it. It is cached under ``HYDRA_CPU_KERNELS_CACHE``
(default ``~/.cache/hydra-pretrain/cpu-kernels``) in a file named by a hash of the source, the
compiler, its flags and this CPU's model and feature flags (``-march=native``: a cache shared by
machines with other CPUs builds its own copy per CPU, never runs another CPU's code). Ranks that
start together each build to a temporary file and rename it into place, so none ever loads a
half-written library.

``HYDRA_CPU_KERNELS`` selects: ``native`` (default: use the library where it builds) or ``torch``
(the pure-PyTorch ops, which define the math). Where the library cannot be built (no compiler,
a compile error), the reason is logged once as a warning and the PyTorch ops run: they compute
the same function, only slower.

Why ``-ffast-math`` only when compiling, never when linking: the driver links ``crtfastmath.o``
into a ``-ffast-math`` shared library, which would turn on flush-to-zero for the whole process at
load and change every other op's results (a test checks that loading leaves denormals alone).
Compiling with it lets GCC vectorise ``exp`` through glibc's libmvec.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

ENV = "HYDRA_CPU_KERNELS"
CACHE_ENV = "HYDRA_CPU_KERNELS_CACHE"
MODES = ("native", "torch")
SOURCE = Path(__file__).with_name("elementwise.cpp")
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17")
# Fallback for a toolchain without glibc's vector math library: scalar exp, no -ffast-math.
PLAIN_COMPILE_FLAGS = ("-O3", "-fPIC", "-std=c++17")
LINK_FLAGS = ("-shared", "-pthread")

log = logging.getLogger(__name__)

_p, _i64, _int, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
# argtypes per entry point (the f32 and f64 variants take the same arguments)
SIGNATURES: dict[str, tuple] = {
    "conv_silu_forward": (_p, _i64, _i64, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _p, _int),
    "conv_silu_backward": (
        (_p, _i64, _i64, _p, _p, _p, _p, _i64, _i64, _i64, _i64) + (_p, _p, _p, _p, _p, _int)
    ),
    "rms_norm_forward": (_p, _i64, _p, _i64, _p, _i64, _i64, _i64, _f64, _p, _p, _int),
    "rms_norm_backward": (_p, _i64, _p, _i64, _p, _i64, _i64, _i64, _f64, _p, _p, _p, _p, _p, _int),
}


class NativeKernels:
    """The loaded library: ``fn(name, dtype)`` returns the entry point for that dtype."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib, self.path = lib, path
        for name, argtypes in SIGNATURES.items():
            for suffix in ("f32", "f64"):
                fn = getattr(lib, f"{name}_{suffix}")
                fn.argtypes, fn.restype = list(argtypes), None
        lib.conv_tile_rows.restype = lib.norm_tile_rows.restype = ctypes.c_int64
        self.conv_tile_rows = int(lib.conv_tile_rows())
        self.norm_tile_rows = int(lib.norm_tile_rows())

    def fn(self, name: str, dtype: torch.dtype) -> ctypes._CFuncPtr:
        return getattr(self.lib, f"{name}_{_SUFFIX[dtype]}")


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
DTYPES = frozenset(_SUFFIX)


def mode() -> str:
    """``HYDRA_CPU_KERNELS``, checked."""
    value = os.environ.get(ENV, "native")
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))  # the first core's lines; the others repeat them


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "hydra-pretrain" / "cpu-kernels"
    return Path(os.environ.get(CACHE_ENV, default))


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile, then link without the compile flags (see the module docstring), into ``target``
    by way of a temporary file in its directory (an atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "elementwise.o", Path(tmp) / target.name
        for cmd in (
            [cxx, *flags, "-c", str(SOURCE), "-o", str(obj)],
            [cxx, *LINK_FLAGS, str(obj), "-o", str(lib)],
        ):
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(lib, target)


def _build() -> NativeKernels:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in (COMPILE_FLAGS, PLAIN_COMPILE_FLAGS):
        key = "\0".join([SOURCE.read_text(), cxx, version, *flags, *LINK_FLAGS, _cpu_identity()])
        target = _cache_dir() / f"elementwise-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        try:
            if not target.exists():
                _compile(cxx, flags, target)
            return NativeKernels(ctypes.CDLL(str(target)), target)
        except (OSError, RuntimeError) as err:
            errors.append(f"{' '.join(flags)}: {err}")
    raise RuntimeError("\n".join(errors))


@cache
def _load() -> NativeKernels | None:
    try:
        kernels = _build()
    except (OSError, RuntimeError) as err:
        log.warning("fused CPU kernels unavailable, using the PyTorch ops (slower): %s", err)
        return None
    log.info("fused CPU kernels: %s", kernels.path)
    return kernels


def native_kernels() -> NativeKernels | None:
    """The library, built on first use; None when ``HYDRA_CPU_KERNELS=torch`` or it cannot be
    built (the warning says why)."""
    if mode() != "native":
        return None
    return _load()


def describe() -> str:
    """One line for logs and benchmark records: the form the CPU elementwise ops take."""
    if mode() != "native":
        return f"PyTorch ops ({ENV}=torch)"
    kernels = _load()
    if kernels is None:
        return "PyTorch ops (the fused CPU kernels did not build: see the warning)"
    return f"fused C++ kernels ({kernels.path})"


def runs_natively(*tensors: torch.Tensor | None) -> NativeKernels | None:
    """The library when these tensors can take the native path (CPU, fp32 or fp64, one dtype;
    not while torch.compile traces: Inductor fuses the PyTorch ops itself), else None."""
    present = [t for t in tensors if t is not None]
    if torch.compiler.is_compiling() or not present:
        return None
    dtype = present[0].dtype
    if dtype not in DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in present):
        return None
    return native_kernels()


def ptr(t: torch.Tensor | None) -> int | None:
    """The data pointer ctypes passes (None: a null pointer)."""
    return None if t is None else t.data_ptr()
