"""``silu(depthwise causal conv)`` over packed documents: the short conv of a Mamba-2 mixer.

Shape legend: B batch, T time, X channels, K taps (conv width).

``out[t] = silu(bias + sum_s w[K-1-s] * x[t-s] * same_doc(t-s, t))`` for shifts s = 0..K-1: a tap
that reaches into an earlier document reads zero, and positions t - s < 0 read the carried-in
``prefix`` (the last K-1 inputs of the previous segment, which continue the row's first document).

Why a custom autograd function: the plain loop (``causal_conv_silu_ref``) allocates four
[B, T, X] tensors per tap and autograd keeps about K + 1 of them, plus the pre-activation for the
SiLU; at 8K tokens that was 6.5% of a Hydra step for 0.04% of its FLOPs, mostly fresh pages
being faulted in. Here the taps accumulate in place, block by block of time (cache-sized on CPU,
``blocking``; one block on GPU), backward recomputes the conv instead of keeping it, and only the
input (in its own dtype: bf16 stays bf16), the weights and the document ids are saved. The
mixer's input ``x`` is a view of ``in_proj``'s output, which its gated norm keeps anyway, so
saving it costs nothing. Shapes never depend on the packing (no host sync).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.cpu import elementwise as native
from kernels.cpu import runs_natively
from pretrain.models.common.blocking import block_rows


def _tap_masks(doc: torch.Tensor | None, K: int, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Per shift s, a [B, T, 1] mask in ``dtype``: 1 where x[t-s] is in t's document (None: all ones).

    Positions t < s read the prefix, which continues the row's first document.
    """
    masks: list[torch.Tensor | None] = [None] * K
    if doc is None:
        return masks
    T = doc.shape[1]
    for s in range(1, K):
        same = doc == doc[:, :1]  # t < s: the prefix belongs to the first document
        if s < T:
            same[:, s:] = doc[:, s:] == doc[:, :-s]
        masks[s] = same[..., None].to(dtype)
    return masks


def _block_rows(x: torch.Tensor, K: int) -> int:
    """Time rows per block: cache-sized on CPU (``blocking``), at least K so that a window's
    carried rows never overlap its new ones."""
    B, T, X = x.shape
    return block_rows(T, 4 * B * X, x.device, minimum=K)


def _windows(
    x: torch.Tensor, prefix: torch.Tensor | None, K: int, block: int, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (t0, window): the input rows t0-(K-1) .. t0+n-1 (n <= block) as one [B, n+K-1, X]
    tensor in ``dtype``, rows before t = 0 from ``prefix`` (zeros without one). One buffer,
    overwritten for each block."""
    B, T, X = x.shape
    buf = x.new_empty((B, min(block, T) + K - 1, X), dtype=dtype)
    if prefix is None:
        buf[:, : K - 1].zero_()
    else:
        buf[:, : K - 1].copy_(prefix)
    for t0 in range(0, T, block):
        n = min(block, T - t0)
        if t0 > 0:  # the previous (full) window's last K-1 rows come first
            buf[:, : K - 1].copy_(buf[:, block : block + K - 1])
        buf[:, K - 1 : K - 1 + n].copy_(x[:, t0 : t0 + n])
        yield t0, buf[:, : n + K - 1]


def _conv_block(
    win: torch.Tensor, w: torch.Tensor, b: torch.Tensor, masks: list[torch.Tensor | None]
) -> torch.Tensor:
    """The pre-activation [B, n, X] of one block: bias + the K taps over ``win`` [B, n+K-1, X]
    (``masks``: the block's rows), accumulated in place into one block-sized tensor."""
    K = w.shape[1]
    n = win.shape[1] - (K - 1)
    acc = torch.addcmul(b, win[:, K - 1 :], w[:, K - 1])  # s = 0: position t itself
    for s in range(1, K):
        src = win[:, K - 1 - s : K - 1 - s + n]
        if masks[s] is not None:
            src = src * masks[s]
        acc.addcmul_(src, w[:, K - 1 - s])
    return acc


def _block_masks(masks: list[torch.Tensor | None], t0: int, n: int) -> list[torch.Tensor | None]:
    return [None if m is None else m[:, t0 : t0 + n] for m in masks]


# Block temporaries are fresh tensors rather than ``out=`` buffers: Dynamo cannot trace ``out=``
# into a non-contiguous slice, and the allocator hands the same block back each time anyway.
class _CausalConvSiLU(torch.autograd.Function):
    """``silu(conv)`` block by block; backward recomputes the conv from the saved input."""

    @staticmethod
    def forward(ctx, x, weight, bias, prefix, doc):  # noqa: ANN001, ANN205 - autograd's signature
        ctx.save_for_backward(x, weight, bias, prefix, doc)
        (B, T, X), K, dtype = x.shape, weight.shape[1], _wide_dtype(x)
        w, b, masks = weight.to(dtype), bias.to(dtype), _tap_masks(doc, K, dtype)
        out = x.new_empty((B, T, X), dtype=dtype)
        for t0, win in _windows(x, prefix, K, _block_rows(x, K), dtype):
            n = win.shape[1] - (K - 1)
            pre = _conv_block(win, w, b, _block_masks(masks, t0, n))
            out[:, t0 : t0 + n].copy_(F.silu(pre, inplace=True))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, bias, prefix, doc = ctx.saved_tensors
        (B, T, X), K, dtype = x.shape, weight.shape[1], _wide_dtype(x)
        w, b, masks = weight.to(dtype), bias.to(dtype), _tap_masks(doc, K, dtype)
        grad_out = grad_out.to(dtype)
        # gradient of the padded input: rows 0..K-2 the prefix, row K-1+t position t
        grad_pad = x.new_empty((B, T + K - 1, X), dtype=dtype)
        grad_pad[:, : K - 1].zero_()
        grad_w = w.new_zeros(w.shape)
        grad_b = b.new_zeros(b.shape)
        for t0, win in _windows(x, prefix, K, _block_rows(x, K), dtype):
            n = win.shape[1] - (K - 1)
            blk_masks = _block_masks(masks, t0, n)
            pre = _conv_block(win, w, b, blk_masks)
            grad_pre = torch.ops.aten.silu_backward(grad_out[:, t0 : t0 + n], pre)
            grad_b += grad_pre.sum((0, 1))
            row = t0 + K - 1  # grad_pad's row of position t0; this block writes it first (s = 0)
            grad_pad[:, row : row + n].copy_(grad_pre).mul_(w[:, K - 1])
            for s in range(K):
                g = grad_pre if blk_masks[s] is None else grad_pre * blk_masks[s]
                if s > 0:
                    grad_pad[:, row - s : row - s + n].addcmul_(g, w[:, K - 1 - s])
                src = win[:, K - 1 - s : K - 1 - s + n]
                grad_w[:, K - 1 - s] += (g * src).sum((0, 1))
        need_x, need_w, need_b, need_prefix, _ = ctx.needs_input_grad
        return (
            grad_pad[:, K - 1 :].to(x.dtype) if need_x else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            grad_pad[:, : K - 1].to(prefix.dtype) if need_prefix else None,
            None,
        )


def _wide_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def causal_conv_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prefix: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu`` of the depthwise causal conv of ``x`` in fp32 (fp64 for fp64 ``x``), taps masked
    per document.

    Args:
        x: [B, T, X] input, any float dtype (saved for backward as it is).
        weight: [X, K] taps; tap K-1 multiplies position t, tap 0 position t - (K-1).
        bias: [X].
        prefix: [B, K-1, X] inputs before t = 0 (they continue each row's first document), or
            None (zeros).
        doc: [B, T] non-decreasing document ids (``kernels.ssd.document_ids``), or None (one
            document per row).

    Returns:
        [B, T, X] fp32 (fp64 for fp64 ``x``).
    """
    with torch.autocast(x.device.type, enabled=False):
        lib = runs_natively(x, weight, bias, prefix)
        if lib is not None:  # one fused pass per direction (kernels/cpu)
            return native.CausalConvSiLU.apply(lib, x, weight, bias, prefix, doc)
        return _CausalConvSiLU.apply(x, weight, bias, prefix, doc)


def causal_conv_silu_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prefix: torch.Tensor | None = None,
    doc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition of ``causal_conv_silu`` as a plain loop over the K taps (autograd through
    every op); the tests compare against it."""
    x = x.to(_wide_dtype(x))
    B, T, X = x.shape
    K = weight.shape[1]
    pad = x.new_zeros(B, K - 1, X) if prefix is None else prefix.to(x.dtype)
    padded = torch.cat([pad, x], dim=1)  # [B, T+K-1, X]
    out = bias.to(x.dtype).expand_as(x)
    doc_padded = None if doc is None else torch.cat([doc[:, :1].expand(-1, K - 1), doc], dim=1)
    for k in range(K):
        tap = padded[:, k : k + T] * weight.to(x.dtype)[:, k]
        if doc_padded is not None:
            tap = tap * (doc_padded[:, k : k + T] == doc)[..., None].to(tap.dtype)
        out = out + tap
    return F.silu(out)
