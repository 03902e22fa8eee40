"""Autograd ops over the fused CPU kernels: ``silu(causal conv)`` and (gated) RMSNorm.

The same functions as ``pretrain.models.common.causal_conv.causal_conv_silu`` and
``pretrain.models.common.fused_norm.rms_norm`` (whose PyTorch forms define them and dispatch
here on CPU; ``native.runs_natively``), computed in one pass per direction instead of a chain
of ops. What backward needs is what the PyTorch ops keep: the inputs (views as they are) and, for
the norm, the per-row 1/rms; everything else is recomputed. Weight gradients come back as one
partial sum per fixed tile of rows, summed here: the same bits whatever the thread count.
"""

from __future__ import annotations

import torch

from kernels.cpu.native import NativeKernels, ptr


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dimension is contiguous (row strides are passed), else a copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _conv_args(x, wt, bias, prefix, doc) -> tuple:  # noqa: ANN001 - tensors, see callers
    return (ptr(x), x.stride(0), x.stride(1), ptr(wt), ptr(bias), ptr(prefix), ptr(doc))


class CausalConvSiLU(torch.autograd.Function):
    """``silu(depthwise causal conv)`` per document; backward recomputes the conv."""

    @staticmethod
    def forward(ctx, lib, x, weight, bias, prefix, doc):  # noqa: ANN001, ANN205
        x, dtype = _unit_stride(x), x.dtype
        (B, T, X), K = x.shape, weight.shape[1]
        wt = weight.to(dtype).t().contiguous()  # [K, X]
        b = bias.to(dtype).contiguous()
        prefix = None if prefix is None else prefix.to(dtype).contiguous()
        doc = None if doc is None else doc.to(torch.int64).contiguous()
        out = x.new_empty((B, T, X))
        lib.fn("conv_silu_forward", dtype)(
            *_conv_args(x, wt, b, prefix, doc), B, T, X, K, ptr(out), torch.get_num_threads()
        )
        ctx.lib = lib
        ctx.save_for_backward(x, weight, bias, prefix, doc)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        lib: NativeKernels = ctx.lib
        x, weight, bias, prefix, doc = ctx.saved_tensors
        (B, T, X), K, dtype = x.shape, weight.shape[1], x.dtype
        wt, b = weight.to(dtype).t().contiguous(), bias.to(dtype).contiguous()
        grad_out = grad_out.to(dtype).contiguous()
        tiles = B * -(-T // lib.conv_tile_rows)
        grad_x = x.new_empty((B, T, X))
        need_prefix = prefix is not None and ctx.needs_input_grad[4]
        grad_prefix = x.new_empty((B, K - 1, X)) if need_prefix else None
        grad_wt_tiles, grad_b_tiles = x.new_empty((tiles, K, X)), x.new_empty((tiles, X))
        lib.fn("conv_silu_backward", dtype)(
            *_conv_args(x, wt, b, prefix, doc),
            B,
            T,
            X,
            K,
            ptr(grad_out),
            ptr(grad_x),
            ptr(grad_prefix),
            ptr(grad_wt_tiles),
            ptr(grad_b_tiles),
            torch.get_num_threads(),
        )
        grad_w = grad_wt_tiles.sum(0).t().to(weight.dtype)
        return None, grad_x, grad_w, grad_b_tiles.sum(0).to(bias.dtype), grad_prefix, None


class RMSNorm(torch.autograd.Function):
    """``rmsnorm(x * silu(gate)) * weight`` per group of channels, on [N, E] rows."""

    @staticmethod
    def forward(ctx, lib, x, gate, weight, group_size, eps):  # noqa: ANN001, ANN205
        x, gate = _unit_stride(x), _unit_stride(gate)
        (N, E), dtype = x.shape, x.dtype
        w = weight.to(dtype).contiguous()
        out = x.new_empty((N, E))
        rstd = x.new_empty((N, E // group_size))
        lib.fn("rms_norm_forward", dtype)(
            *_norm_args(x, gate, w, group_size, eps), ptr(out), ptr(rstd), torch.get_num_threads()
        )
        ctx.lib, ctx.group_size, ctx.eps = lib, group_size, eps
        ctx.save_for_backward(x, gate, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        lib: NativeKernels = ctx.lib
        x, gate, weight, rstd = ctx.saved_tensors
        (N, E), dtype = x.shape, x.dtype
        w = weight.to(dtype).contiguous()
        grad_out = grad_out.to(dtype).contiguous()
        grad_x = x.new_empty((N, E))
        grad_gate = None if gate is None else x.new_empty((N, E))
        grad_w_tiles = x.new_empty((-(-N // lib.norm_tile_rows), E))
        lib.fn("rms_norm_backward", dtype)(
            *_norm_args(x, gate, w, ctx.group_size, ctx.eps),
            ptr(rstd),
            ptr(grad_out),
            ptr(grad_x),
            ptr(grad_gate),
            ptr(grad_w_tiles),
            torch.get_num_threads(),
        )
        return None, grad_x, grad_gate, grad_w_tiles.sum(0).to(weight.dtype), None, None


def _norm_args(x, gate, w, group_size, eps) -> tuple:  # noqa: ANN001 - tensors, see callers
    N, E = x.shape
    gate_stride = 0 if gate is None else gate.stride(0)
    return (ptr(x), x.stride(0), ptr(gate), gate_stride, ptr(w), N, E, group_size, float(eps))
