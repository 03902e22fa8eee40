"""Small building blocks shared by every model family: RMSNorm, SwiGLU, rotary embeddings, and
a linear map computed in fp32 that keeps its input in its own dtype for backward.

Shape legend: B batch, T time, D d_model, H heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.gating import silu_mul
from pretrain.models.common.fused_norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (fp64 for fp64 inputs) and cast back (stable
    under bf16 autocast)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D] in x's dtype (one op that saves only x and 1/rms: ``rms_norm``)."""
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def init_weights(self, init_std: float = 0.02) -> None:
        for lin in (self.w1, self.w3, self.w2):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)

    def forward(
        self, x: torch.Tensor, seq_idx: torch.Tensor | None = None, *, context: object = None
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; per token, so ``seq_idx`` and ``context`` are ignored."""
        return self.w2(silu_mul(self.w1(x), self.w3(x)))

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token: ``proj``, two per weight (three matmuls, ``seq_len``-free)."""
        return {"proj": 2.0 * sum(p.numel() for p in self.parameters())}

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings at integer ``positions`` (any shape) -> [..., head_dim/2]."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim of ``x`` [B, T, H, K].

    ``cos``/``sin`` are [T, K/2] or [B, T, K/2] (per-sequence positions, e.g. document resets).
    """
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class _WideLinear(torch.autograd.Function):
    """``F.linear`` in fp32 (fp64 for fp64 inputs) whose backward keeps x as it came (bf16 stays
    bf16): an upcast copy made for the matmul would otherwise be what autograd saves."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        with torch.autocast(grad.device.type, enabled=False):  # stay in the wide dtype
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                rows = grad.reshape(-1, grad.shape[-1]).t()  # [out, rows]
                grad_w = (rows @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)
        return grad_x, grad_w


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed in fp32 at least, whatever autocast says, for decisions that
    must not flip in bf16 (the MoE router). Backward saves ``x`` in its own dtype.

    Args:
        x: [..., D_in] in any float dtype.
        weight: [D_out, D_in].

    Returns:
        [..., D_out] in the wider of fp32 and the inputs' dtypes.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _WideLinear.apply(x, weight)
