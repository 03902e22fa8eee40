"""The SSD scan op with a choice of backend: ``torch`` (chunked, CPU), ``triton``, ``mamba_ssm``.

Shape legend: b batch, T time, H heads, P head dim, G B/C groups, N state size.

All backends compute the op defined in ``kernels/ssd/ref.py`` (same arguments, same outputs):
``dt`` is already softplus'ed, ``A`` negative, a change of ``seq_idx`` starts a document, the
initial state belongs to the first document of each row, y comes back in x's dtype and the final
state in fp32 (fp64 for fp64 inputs). ``torch`` is ``kernels.ssd.chunked.ssd_scan_bounded``: the
chunked algorithm of ``ssd_scan_chunked`` with a hand-written backward that keeps O(T * state)
for backward instead of every chunk's [L, L] tensors.

mamba_ssm (``mamba_chunk_scan_combined``), argument by argument:

* ``dt``: mamba adds ``dt_bias`` and applies softplus only when asked (``dt_bias=None``,
  ``dt_softplus=False`` here, since our dt is final), then clamps to ``dt_limit`` whose default
  (0, inf) leaves a positive dt unchanged.
* ``D=None``, ``z=None``: the skip connection and the gate stay in the mixer, as for the other
  backends.
* ``seq_idx``: mamba resets the state where ``seq_idx`` changes (it compares the ids at chunk ends
  and inside chunks) and applies ``initial_states`` only to positions whose id equals 0. We pass
  ``document_ids(seq_idx)`` (0, 1, 2, ... per row, int32), which makes both rules ours. mamba_ssm's
  packed path is reported to differ from running the documents separately by ~1e-3
  (state-spaces/mamba#758); our torch and triton paths agree with the separate runs to fp32
  rounding. The mamba_ssm backend is not tested here (no CUDA); its argument mapping is tested
  against a stand-in module with mamba's documented semantics.
* ``return_final_states=True`` gives ``(out, final_states)``; the final state is cast to fp32.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

import torch

from kernels.backends import TRITON_MODULES, BackendUnavailableError, load_backend_function
from kernels.ssd.chunked import ssd_scan_bounded
from kernels.ssd.ref import document_ids

_MAMBA_MODULE = "mamba_ssm.ops.triton.ssd_combined"
_mamba_chunk_scan: Callable | None = None


def _load_without_package_init() -> types.ModuleType:
    """Import ``mamba_ssm.ops.triton.ssd_combined`` without executing ``mamba_ssm/__init__.py``.

    The package ``__init__`` imports the selective-scan CUDA extension (and causal-conv1d), which
    often fails to build or load (mamba #55, #481) although the pure-Triton SSD kernels would
    work. A stand-in package module whose ``__path__`` points at the installed directory lets
    the normal import machinery load the submodules (and their absolute imports of siblings).
    The stand-in stays in ``sys.modules`` so that those imports keep working later.
    """
    spec = importlib.util.find_spec("mamba_ssm")  # a top-level spec does not run __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mamba_ssm is not installed", name="mamba_ssm")
    stub = types.ModuleType("mamba_ssm", "Stand-in for mamba_ssm (its __init__ was skipped).")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    sys.modules["mamba_ssm"] = stub
    try:
        return importlib.import_module(_MAMBA_MODULE)
    except Exception:
        if sys.modules.get("mamba_ssm") is stub:
            del sys.modules["mamba_ssm"]
        raise


def load_mamba_chunk_scan() -> Callable:
    """``mamba_chunk_scan_combined`` from mamba_ssm (cached after the first success).

    Raises:
        ModuleNotFoundError: mamba_ssm is not installed.
        Exception: whatever loading its Triton SSD module raised.
    """
    global _mamba_chunk_scan
    if _mamba_chunk_scan is None:
        try:
            module = importlib.import_module(_MAMBA_MODULE)
        except ModuleNotFoundError as err:
            if err.name == "mamba_ssm":
                raise
            module = _load_without_package_init()
        except Exception:  # the package __init__ failed (CUDA extension), the module may not
            module = _load_without_package_init()
        _mamba_chunk_scan = module.mamba_chunk_scan_combined
    return _mamba_chunk_scan


def _ssd_scan_mamba(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        scan = load_mamba_chunk_scan()
    except Exception as err:  # noqa: BLE001 - reported, never swallowed
        raise BackendUnavailableError("ssd", "mamba_ssm", f"{type(err).__name__}: {err}") from err
    mamba_seq_idx = None
    if seq_idx is not None:
        mamba_seq_idx = document_ids(seq_idx).to(torch.int32).contiguous()
    y, final_state = scan(
        x,
        dt,
        A,
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=initial_state,
        seq_idx=mamba_seq_idx,
        dt_softplus=False,
        return_final_states=True,
    )
    return y.to(x.dtype), final_state.to(torch.promote_types(x.dtype, torch.float32))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-2 SSD scan (``kernels/ssd/ref.py`` defines it) on the chosen backend.

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes, already softplus'ed (> 0).
        A: [H] negative decay rates.
        B: [b, T, G, N] input projections (head h uses group h // (H // G)).
        C: [b, T, G, N] output projections.
        chunk_size: chunk length of the chunked algorithm.
        initial_state: [b, H, P, N] state before t = 0 (zeros if None); first document only.
        seq_idx: [b, T] document index per position (None: one document per row).
        backend: ``torch`` | ``triton`` | ``mamba_ssm`` (see ``kernels.backends``).

    Returns:
        y [b, T, H, P] in x's dtype and final_state [b, H, P, N] in fp32 (fp64 for fp64 x).

    Raises:
        BackendUnavailableError: the backend's module cannot be imported.
        ValueError: unknown backend.
    """
    if backend == "torch":
        return ssd_scan_bounded(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    if backend == "triton":
        scan = load_backend_function("ssd", "triton", *TRITON_MODULES["ssd"])
        return scan(x, dt, A, B, C, chunk_size, initial_state=initial_state, seq_idx=seq_idx)
    if backend == "mamba_ssm":
        return _ssd_scan_mamba(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
    raise ValueError(f"unknown ssd backend '{backend}'; known: torch, triton, mamba_ssm")
