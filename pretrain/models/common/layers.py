"""Small building blocks shared by every model family: RMSNorm, SwiGLU, rotary embeddings.

Shape legend: B batch, T time, D d_model, H heads, K head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (stable under bf16 autocast)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


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
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: two per weight (three matmuls, ``seq_len``-free)."""
        return 2 * sum(p.numel() for p in self.parameters())


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
