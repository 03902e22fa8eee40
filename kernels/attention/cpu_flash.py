"""Masked attention on PyTorch's CPU flash kernels, keeping for backward only what builds its inputs.

``F.scaled_dot_product_attention`` with a mask keeps, for its backward, the keys, values and the
mask exactly as the kernel got them; the CPU path turns a boolean mask into an additive one in
the query's dtype first. When those are built from smaller tensors (a causal attention's
document ids; sparse attention's per-block gathers of keys and values), that is what dominates:
the Transformer baseline's per-block fp32 masks came to 2.2 GB per layer at 32K tokens, and
Hydra's per-block key/value gathers and mask to ~75 MB per attention layer at 8K.

``attend_rebuilding_inputs(build, q, *sources)`` runs the same CPU flash kernels that SDPA runs
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward), saves ``q``, the output,
its log-sum-exp and ``sources``, and in backward calls ``build(*sources)`` again (a few copies)
and sends the key/value gradients back through it with autograd. Same kernels, same FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# build(*sources) -> (keys, values, additive mask), in the layouts the kernel takes:
# [B, H, L, K], [B, H, L, K], a mask broadcastable to [B, H, W, L] in the query's dtype
Builder = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def runs_on_cpu_flash(q: torch.Tensor, gqa: bool) -> bool:
    """Whether ``attend_rebuilding_inputs`` applies: eager CPU training in fp32/fp64 without
    GQA (the CPU flash op takes equal head counts); otherwise plain SDPA keeps its inputs."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and not gqa
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible``, -inf elsewhere, in ``dtype`` (what SDPA makes of a boolean mask)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )


class _RebuiltInputsAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, build, scale, q, *sources):  # noqa: ANN001, ANN205
        k, v, mask = build(*sources)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        ctx.build, ctx.scale = build, scale
        ctx.save_for_backward(q, out, lse, *sources)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, out, lse, *sources = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        leaves = [
            None if s is None else s.detach().requires_grad_(w) for s, w in zip(sources, wanted)
        ]
        with torch.enable_grad():
            k, v, mask = ctx.build(*leaves)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale
        )
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        inputs = [i for i, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
        if inputs:
            found = torch.autograd.grad(
                (k, v), [leaves[i] for i in inputs], (gk, gv), allow_unused=True
            )
            for i, g in zip(inputs, found):
                grads[i] = g
        return None, None, gq, *grads


def attend_rebuilding_inputs(
    build: Builder, q: torch.Tensor, *sources: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Masked attention of ``q`` [B, H, W, K] over ``build(*sources)``, as SDPA computes it.

    Args:
        build: makes (keys, values, additive mask) from ``sources``; differentiable in them.
        q: queries.
        sources: what the keys, values and mask are made from (None allowed); kept for backward.
        scale: score scale, default K ** -0.5.

    Returns:
        [B, H, W, K].
    """
    return _RebuiltInputsAttention.apply(build, scale, q, *sources)
