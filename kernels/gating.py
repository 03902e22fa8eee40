"""SwiGLU's gating ``silu(a) * b`` as one autograd op (the dense FFN and every MoE expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SiLUMul(torch.autograd.Function):
    """``silu(a) * b`` saving only a and b: autograd through the two ops also kept silu(a), one
    more [rows, F] tensor per feed-forward layer or expert; backward recomputes it instead."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * b, a), F.silu(a).mul_(grad)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for same-shaped, same-dtype a and b (the two projections)."""
    return _SiLUMul.apply(a, b)
