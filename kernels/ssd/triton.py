"""The Mamba-2 SSD chunked scan in Triton: custom ops, autograd and the public function.

Shape legend: b batch, T time, H heads, P head dim, G groups of B/C, N state size.

Forward and backward are all Triton (``triton_fwd.py``, ``triton_bwd.py``); the op they compute
is defined by ``kernels.ssd.ref`` (``ssd_scan_sequential``; ``ssd_scan_chunked`` is the same
algorithm in PyTorch and the CPU path). The backward saves only the inputs and recomputes the
forward pieces, so memory stays that of the inputs. Both directions are ``torch.library`` custom
ops with fake implementations, so ``torch.compile`` traces through them without graph breaks.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is first imported); that is what the CPU tests do.
"""

from __future__ import annotations

import torch

from kernels.ssd.ref import _check_inputs
from kernels.ssd.triton_bwd import ssd_backward
from kernels.ssd.triton_fwd import ssd_forward

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("hydra_kernels::ssd_scan_fwd", mutates_args=())
def _ssd_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ssd_forward(x, dt, A, B, C, chunk_size, initial_state, seq_idx)


@_ssd_scan_fwd.register_fake
def _ssd_scan_fwd_fake(x, dt, A, B, C, chunk_size, initial_state, seq_idx):
    # the launchers allocate contiguous outputs, whatever the inputs' strides
    b, _, H, P = x.shape
    return x.new_empty(x.shape), x.new_empty((b, H, P, B.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("hydra_kernels::ssd_scan_bwd", mutates_args=())
def _ssd_scan_bwd(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(ssd_backward(dy, dfinal, x, dt, A, B, C, chunk_size, initial_state, seq_idx))


@_ssd_scan_bwd.register_fake
def _ssd_scan_bwd_fake(dy, dfinal, x, dt, A, B, C, chunk_size, initial_state, seq_idx):
    b, _, H, P = x.shape
    init_dtype = torch.float32 if initial_state is None else initial_state.dtype
    d_init = x.new_empty((b, H, P, B.shape[-1]), dtype=init_dtype)
    return (*(t.new_empty(t.shape) for t in (x, dt, A, B, C)), d_init)


class _SSDScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, initial_state, seq_idx):
        y, final_state = torch.ops.hydra_kernels.ssd_scan_fwd(
            x, dt, A, B, C, chunk_size, initial_state, seq_idx
        )
        ctx.save_for_backward(x, dt, A, B, C, initial_state, seq_idx)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, initial_state, seq_idx = ctx.saved_tensors
        if dy is None:  # only the final state was used
            dy = torch.zeros_like(x)
        dx, ddt, dA, dB, dC, d_init = torch.ops.hydra_kernels.ssd_scan_bwd(
            dy, dfinal, x, dt, A, B, C, ctx.chunk_size, initial_state, seq_idx
        )
        return dx, ddt, dA, dB, dC, None, (None if initial_state is None else d_init), None


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by Triton kernels; same op and shapes as ``ssd_scan_chunked``.

    Differentiable w.r.t. x, dt, A, B, C and initial_state. Inputs may be fp32, bf16 or fp16
    (each tensor on its own; every matmul takes x's dtype as operand dtype, fp32 runs them in
    IEEE fp32); state and accumulation are fp32. Any T, any chunk size, G groups; deterministic.

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes, already softplus'ed (> 0).
        A: [H] negative decay rates.
        B: [b, T, G, N] input projections (head h uses group h // (H // G)).
        C: [b, T, G, N] output projections.
        chunk_size: L, the chunk length (64-256 on GPU).
        initial_state: [b, H, P, N] state before t = 0 (zeros if None); first document only.
        seq_idx: [b, T] document index per position (None: one document per row); a change of
            value starts a document and nothing crosses it.

    Returns:
        y [b, T, H, P] in x's dtype and final_state [b, H, P, N] fp32.
    """
    _check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("state", initial_state)):
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(f"ssd_scan_triton: {name} must be fp32, bf16 or fp16, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"ssd_scan_triton: {name} is on {t.device}, x on {x.device}")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.device != x.device):
        raise TypeError(
            f"seq_idx must be an integer tensor on {x.device}, got {seq_idx.dtype} on {seq_idx.device}"
        )
    return _SSDScanTriton.apply(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
