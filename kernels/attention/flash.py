"""Sparse global attention with flash-attn: windowed flash for the local part, summaries merged by LSE.

Shape legend: b batch, T time, H query heads, Hkv key/value heads, g = H / Hkv, K head dim,
n query blocks of W = min(window, T) positions (the blocked layout of ``kernels/attention/ref.py``),
Σ = b * T packed positions.

flash-attn knows sliding windows but not summary tokens, so the op is computed in two parts:

1. local: ``flash_attn_varlen_func`` over the documents of the batch (``cu_seqlens`` from
   ``seq_idx``, so no window crosses a document boundary), ``causal=True``,
   ``window_size=(window - 1, 0)``: query t sees keys t - window + 1 .. t. It returns the
   normalised output o1 and, with ``return_attn_probs=True``, the log-sum-exp lse1 of the scaled
   scores (fp32, [H, Σ] in flash-attn >= 2.5 varlen; other layouts are rejected).
2. summaries: the blocked PyTorch part of ``kernels/attention/ref.py`` (fp32, the same visibility
   rule and memory bound as the CPU path), then a log-sum-exp merge with part 1.

Gradients: flash-attn's autograd returns no gradient for its LSE output, but the merged output
depends on lse1 (through the weight ``exp(lse1 - M)`` of part 1). ``_LocalLSE`` restores that
gradient with the public API only: d lse_t / d q_t = scale * sum_s p_ts k_s (the attention output
with the keys as values) and d lse_t / d k_s = scale * p_ts q_t (the value gradient of that same
attention for the output gradient ``scale * g_t * q_t``). That costs one more flash forward and
backward of the local part, in the backward only.

Not tested on GPU here (no CUDA in the test environment). The CPU tests run this file with a
dense stand-in for ``flash_attn_varlen_func`` that follows its documented semantics (including the
missing LSE gradient), which checks the varlen layout, the merge and the LSE gradient against the
dense reference; the flash kernel itself is flash-attn's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.attention.ref import (
    ChunkSummaries,
    _check_inputs,
    _merge_parts,
    _Part,
    _summary_part,
    document_ids,
)
from kernels.backends import load_backend_function


def _load_flash_varlen() -> Callable:
    """``flash_attn.flash_attn_varlen_func``, imported at call time."""
    return load_backend_function("attention", "flash_attn", "flash_attn", "flash_attn_varlen_func")


def _document_cu_seqlens(doc: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the documents of all rows, flattened: cu_seqlens [n_docs + 1] int32, max len."""
    b, T = doc.shape
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]  # every row starts a document at t = 0
    first = starts.reshape(-1).nonzero().squeeze(1)
    cu = torch.cat([first, first.new_full((1,), b * T)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


class _LocalLSE(torch.autograd.Function):
    """Identity on flash-attn's (detached) LSE whose backward adds the LSE's gradient to q and k."""

    @staticmethod
    def forward(ctx, q, k, lse, attend, scale):  # noqa: ANN001, ANN205 (autograd.Function API)
        ctx.save_for_backward(q, k)
        ctx.attend, ctx.scale = attend, scale
        return lse.clone()

    @staticmethod
    def backward(ctx, g_lse):  # noqa: ANN001, ANN205
        q, k = ctx.saved_tensors  # [Σ, H, K], [Σ, Hkv, K]; g_lse [Σ, H] fp32
        acc = torch.promote_types(q.dtype, torch.float32)
        g = ctx.scale * g_lse[..., None].to(acc)
        with torch.enable_grad():
            keys_as_values = k.detach().requires_grad_(True)
            o_k = ctx.attend(q.detach(), k.detach(), keys_as_values)  # sum_s p_ts k_s
            (g_k,) = torch.autograd.grad(o_k, keys_as_values, (g * q.to(acc)).to(q.dtype))
        g_q = (g * o_k.detach().to(acc)).to(q.dtype)
        return g_q, g_k, None, None, None


def _local_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    window: int,
    scale: float,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windowed flash attention per document: o1 [b, T, H, K] and lse1 [b, T, H] fp32 (or None)."""
    flash = _load_flash_varlen()
    b, T, H, K = q.shape
    cu, max_len = _document_cu_seqlens(doc)
    kwargs = {
        "softmax_scale": scale,
        "causal": True,
        "window_size": (window - 1, 0),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }

    def attend(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return flash(q_, k_, v_, cu, cu, max_len, max_len, **kwargs)

    q_f, k_f, v_f = (t.reshape(b * T, t.shape[2], K) for t in (q, k, v))
    if not need_lse:
        return attend(q_f, k_f, v_f).view(b, T, H, K), None
    out, lse, _ = flash(q_f, k_f, v_f, cu, cu, max_len, max_len, return_attn_probs=True, **kwargs)
    if tuple(lse.shape) != (H, b * T):
        raise RuntimeError(
            f"flash_attn_varlen_func returned softmax_lse of shape {tuple(lse.shape)}, expected"
            f" [H, total] = {(H, b * T)} (flash-attn >= 2.5); this flash-attn is not supported"
        )
    lse = lse.detach().to(torch.promote_types(lse.dtype, torch.float32)).t()  # [Σ, H]
    lse = _LocalLSE.apply(q_f, k_f, lse, attend, scale)
    return out.view(b, T, H, K), lse.view(b, T, H)


def _to_blocks(x: torch.Tensor, blk: int, hkv: int) -> torch.Tensor:
    """[b, T, H, ...] -> [b, n, Hkv, g, W, ...] (time padded to n * W at the back)."""
    b, T, H = x.shape[:3]
    pad = (-T) % blk
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.view(b, (T + pad) // blk, blk, hkv, H // hkv, *x.shape[3:])
    return x.movedim(2, 4)


def sparse_global_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    summaries: ChunkSummaries | None,
    *,
    window: int,
    n_global: int,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sparse global attention (the op of ``kernels/attention/ref.py``) with flash-attn's window.

    Args:
        q: [b, T, H, K] queries (fp16/bf16 on CUDA: flash-attn's kernels accept nothing else).
        k, v: [b, T, Hkv, K] keys and values (Hkv divides H).
        summaries: summary tokens sorted by ``end`` per row, or ``None`` (local attention only).
        window: local causal window in tokens, the query included.
        n_global: at most this many summaries per query (the most recent candidates).
        seq_idx: [b, T] document numbers of packed rows, ``None``: one document per row.
        scale: score scale, default ``K ** -0.5``.

    Returns:
        [b, T, H, K] in q's dtype. The local part runs in q's dtype (fp32 softmax statistics),
        the summary part and the merge in fp32.
    """
    _check_inputs(q, k, v, window, n_global)
    if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_attn needs fp16/bf16 inputs, got {q.dtype}: run under autocast")
    b, T, H, K = q.shape
    hkv = k.shape[2]
    scale = K**-0.5 if scale is None else scale
    doc = document_ids(seq_idx, b, T, q.device)
    with_summaries = summaries is not None and n_global > 0 and summaries.end.shape[1] > 0
    out1, lse1 = _local_part(q, k, v, doc, window, scale, need_lse=with_summaries)
    if not with_summaries:
        return out1
    ends = summaries.end
    if ends.shape[1] > 1 and bool((ends[:, 1:] < ends[:, :-1]).any()):
        raise ValueError("summaries must be sorted by end position within each row")

    dtype = torch.promote_types(q.dtype, torch.float32)
    blk = min(window, T)
    with torch.autocast(q.device.type, enabled=False):
        q_blk = _to_blocks(q.to(dtype) * scale, blk, hkv).movedim(4, 2)  # [b, n, W, Hkv, g, K]
        cast = summaries._replace(k=summaries.k.to(dtype), v=summaries.v.to(dtype))
        glob = _summary_part(q_blk, cast, doc, window, n_global)
        lse_blk = _to_blocks(lse1[..., None], blk, hkv)  # [b, n, Hkv, g, W, 1]
        local = _Part(_to_blocks(out1.to(dtype), blk, hkv), torch.ones_like(lse_blk), lse_blk)
        out = _merge_parts(local, glob)  # [b, n, Hkv, g, W, K]
    out = out.movedim(4, 2).reshape(b, -1, H, K)[:, :T]
    return out.to(q.dtype)
