"""Kernel backend selection: which implementation runs each op, chosen once at start-up.

Five ops, each with a pure-PyTorch ``torch`` backend that runs anywhere and defines the op:

=========  ================================================================================
op         backends (``auto`` on CUDA tries them left to right; on CPU it is always ``torch``)
=========  ================================================================================
ssd        mamba_ssm > triton > torch
pkm        triton > torch
moe        megablocks > grouped_mm > torch  (compiled: grouped_mm first, on CPU too)
attention  flex > flash_attn > torch
boundary_  flex > torch  (``boundary_attention``: Attamba's chunk-boundary attention)
attention
=========  ================================================================================

``backend_problem(op, backend, device)`` says why a backend cannot run (an import fails, the device
is not CUDA, this torch lacks ``grouped_mm``, ...) or returns None. ``select_backends`` resolves a
request such as ``{"ssd": "auto", "moe": "grouped_mm"}``: ``auto`` takes the first available
backend of the list above, an explicit name that cannot run raises ``BackendUnavailableError``
naming the op, the backend and the reason. Nothing ever falls back silently. The choice is logged
on the ``kernels`` logger, one line per op.

Why ``flex`` before ``flash_attn`` for sparse global attention: flash-attn has no notion of summary
tokens, so its path (``kernels/attention/flash.py``) runs flash for the local window and a blocked
PyTorch attention for the summaries and merges the two by log-sum-exp. flash-attn's autograd drops
the gradient of its LSE output, so that path spends one more flash forward + backward to restore
it; FlexAttention computes window and summaries in one fused kernel and is checked against the
reference on CPU (forward). flash_attn stays available by explicit request.

Deterministic mode (``select_backends(..., deterministic=True)``) never picks a backend that
autotunes its kernel configurations (launch configs then depend on timing, and results on the
configs): ``mamba_ssm`` (``triton.autotune`` on every SSD kernel) and ``megablocks`` (autotuned
Triton kernels plus atomic scatter-adds). Asking for one of them explicitly in deterministic mode
is an error. Our Triton kernels use fixed block sizes, FlexAttention is compiled without
max-autotune, and flash-attn's backward follows ``torch.are_deterministic_algorithms_enabled()``.

The Triton interpreter (``TRITON_INTERPRET=1``) makes the ``triton`` backends available on CPU;
it is meant for tests, so ``auto`` never picks it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping

import torch

logger = logging.getLogger("kernels")

BACKENDS: dict[str, tuple[str, ...]] = {
    "ssd": ("torch", "triton", "mamba_ssm"),
    "pkm": ("torch", "triton"),
    "moe": ("torch", "grouped_mm", "megablocks"),
    "attention": ("torch", "flex", "flash_attn"),
    "boundary_attention": ("torch", "flex"),
}

# Preference of ``auto`` on CUDA, best first (see the module docstring for attention's order).
AUTO_ORDER_CUDA: dict[str, tuple[str, ...]] = {
    "ssd": ("mamba_ssm", "triton", "torch"),
    "pkm": ("triton", "torch"),
    "moe": ("megablocks", "grouped_mm", "torch"),
    "attention": ("flex", "flash_attn", "torch"),
    "boundary_attention": ("flex", "torch"),
}

# Under torch.compile, ``auto`` tries these first, on any device: they trace without a host
# sync. The torch expert loop and megablocks take the group sizes on the host: a graph break per
# MoE layer, and under activation checkpointing a recompute that can run other graphs than its
# forward did (torch.utils.checkpoint.CheckpointError).
AUTO_FIRST_WHEN_COMPILED: dict[str, tuple[str, ...]] = {"moe": ("grouped_mm",)}

# Backends whose kernels pick their launch configs by timing (and so are not reproducible).
AUTOTUNING: frozenset[tuple[str, str]] = frozenset({("ssd", "mamba_ssm"), ("moe", "megablocks")})

# Where the Triton backends of this project live: (module, public function).
TRITON_MODULES: dict[str, tuple[str, str]] = {
    "ssd": ("kernels.ssd.triton", "ssd_scan_triton"),
    "pkm": ("kernels.pkm.triton", "pkm_lookup_triton"),
}


class BackendUnavailableError(RuntimeError):
    """A kernel backend was asked for but cannot run here."""

    def __init__(self, op: str, backend: str, reason: str) -> None:
        super().__init__(f"kernel backend '{backend}' for op '{op}' is unavailable: {reason}")
        self.op = op
        self.backend = backend
        self.reason = reason


def import_problem(module: str, attr: str | None = None) -> str | None:
    """Why ``import module`` (and ``module.attr``) fails, or None when it works.

    Optional GPU packages fail in many ways besides ``ImportError`` (a CUDA extension built for
    another torch raises ``OSError`` or ``RuntimeError``), so any exception counts.
    """
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - every failure is a reason to report, not to crash
        return f"import {module} failed ({type(err).__name__}: {err})"
    if attr is not None and not hasattr(mod, attr):
        return f"{module} has no attribute {attr}"
    return None


def load_backend_function(op: str, backend: str, module: str, attr: str) -> Callable:
    """``module.attr``, imported at call time; raises ``BackendUnavailableError`` if missing."""
    problem = import_problem(module, attr)
    if problem is not None:
        raise BackendUnavailableError(op, backend, problem)
    return getattr(importlib.import_module(module), attr)


def _triton_problem(op: str, device: torch.device) -> str | None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"needs a CUDA device (device is {device}; TRITON_INTERPRET=1 runs it on CPU)"
    problem = import_problem("triton")
    if problem is not None:
        return problem
    module, attr = TRITON_MODULES[op]
    return import_problem(module, attr)


def _needs_cuda(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device (device is {device})"
    return None


def _mamba_ssm_problem(device: torch.device) -> str | None:
    problem = _needs_cuda(device)
    if problem is not None:
        return problem
    from kernels.ssd.op import load_mamba_chunk_scan  # lazy: op modules import this one

    try:
        load_mamba_chunk_scan()
    except Exception as err:  # noqa: BLE001
        return f"mamba_ssm's SSD kernels could not be loaded ({type(err).__name__}: {err})"
    return None


def _grouped_mm_problem(device: torch.device) -> str | None:
    import torch.nn.functional as F

    if getattr(F, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
    if device.type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"grouped_mm needs a GPU of compute capability >= 8.0, got {major}.x"
    return None


def _megablocks_problem(device: torch.device) -> str | None:
    return (
        _needs_cuda(device)
        or import_problem("megablocks.ops")
        or import_problem("grouped_gemm", "ops")  # megablocks' grouped GEMM (grouped_gemm.ops.gmm)
    )


def _flex_problem(device: torch.device) -> str | None:
    problem = import_problem("torch.nn.attention.flex_attention", "flex_attention")
    if problem is not None:
        return f"this torch has no FlexAttention: {problem}"
    # CPU runs flex forward only (torch raises on backward), so training cannot use it there
    return _needs_cuda(device)


def _flash_attn_problem(device: torch.device) -> str | None:
    return _needs_cuda(device) or import_problem("flash_attn", "flash_attn_varlen_func")


def backend_problem(op: str, backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``, or None when it can.

    Imports optional packages (only) when asked about them.

    Raises:
        ValueError: unknown op or backend name.
    """
    _check_name(op, backend)
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_problem(op, device)
    checks = {
        "mamba_ssm": _mamba_ssm_problem,
        "grouped_mm": _grouped_mm_problem,
        "megablocks": _megablocks_problem,
        "flex": _flex_problem,
        "flash_attn": _flash_attn_problem,
    }
    return checks[backend](device)


def _check_name(op: str, backend: str) -> None:
    if op not in BACKENDS:
        raise ValueError(f"unknown kernel op '{op}'; known: {list(BACKENDS)}")
    if backend not in BACKENDS[op]:
        raise ValueError(f"unknown backend '{backend}' for op '{op}'; known: {list(BACKENDS[op])}")


def _resolve_auto(
    op: str, device: torch.device, deterministic: bool, compiled: bool = False
) -> tuple[str, list[str]]:
    """The first usable backend of ``op``'s preference list, and why better ones were skipped."""
    skipped = []
    for backend in AUTO_FIRST_WHEN_COMPILED.get(op, ()) if compiled else ():
        problem = backend_problem(op, backend, device)
        if problem is None:
            return backend, skipped
        skipped.append(f"{backend}: {problem}")
    if device.type != "cuda":
        return "torch", skipped  # the Triton interpreter is for tests; everything else needs CUDA
    for backend in AUTO_ORDER_CUDA[op]:
        if deterministic and (op, backend) in AUTOTUNING:
            skipped.append(f"{backend}: autotunes (deterministic mode)")
            continue
        problem = backend_problem(op, backend, device)
        if problem is None:
            return backend, skipped
        skipped.append(f"{backend}: {problem}")
    raise AssertionError("torch is always available")  # pragma: no cover


def select_backends(
    requested: Mapping[str, str],
    device: torch.device | str,
    deterministic: bool = False,
    compiled: bool = False,
) -> dict[str, str]:
    """Resolve the backend of every op, checking that each one can run; log the choice.

    Args:
        requested: op -> backend name or ``"auto"``; ops left out are ``auto``.
        device: where the model runs.
        deterministic: never pick (nor accept) a backend that autotunes its kernels.
        compiled: the blocks will be compiled: ``auto`` first tries the backends that trace
            without a host sync (``AUTO_FIRST_WHEN_COMPILED``).

    Returns:
        op -> concrete backend, for every op in ``BACKENDS``.

    Raises:
        ValueError: an unknown op or backend name.
        BackendUnavailableError: an explicitly requested backend cannot run here.
    """
    device = torch.device(device)
    unknown = set(requested) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown kernel ops {sorted(unknown)}; known: {list(BACKENDS)}")
    chosen = {}
    for op in BACKENDS:
        want = requested.get(op, "auto")
        if want == "auto":
            chosen[op], skipped = _resolve_auto(op, device, deterministic, compiled)
            note = f"auto; skipped {'; '.join(skipped)}" if skipped else "auto"
        else:
            _check_name(op, want)
            problem = backend_problem(op, want, device)
            if problem is None and deterministic and (op, want) in AUTOTUNING:
                problem = "it autotunes its kernels, which deterministic mode forbids"
            if problem is not None:
                raise BackendUnavailableError(op, want, problem)
            chosen[op], note = want, "requested"
        logger.info("kernel backend for %s: %s (%s, device %s)", op, chosen[op], note, device)
    return chosen
