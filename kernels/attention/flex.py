"""Sparse global attention with FlexAttention: one fused kernel for the window and the summaries.

Shape legend: b batch, T time, H query heads, Hkv key/value heads, K head dim, S summaries per row.

The keys and values are the T tokens followed by the S summary tokens of the row; a ``mask_mod``
states the visibility rule of ``kernels/attention/ref.py`` for every (query, key) pair:

* key s < T (a token): ``t - window < s <= t`` and s in t's document;
* key T + j (summary j): ``end[j] <= t - window``, summary j lies inside one document and that
  document is t's, and j is among the ``n_global`` most recent such summaries. With summaries
  sorted by end, the candidates of t are the eligible summaries of index < hi(t) (hi(t) = number
  of summaries ending at or before t - window), so "most recent n_global" reads
  ``E[hi(t)] - E[j] <= n_global`` with E the exclusive prefix count of eligible summaries (the
  blocked CPU path uses the same identity).

FlexAttention turns the mask into a block-sparse ``BlockMask`` (128 x 128 tiles): tiles outside the
window band and the summary columns are skipped, so the cost stays O(T * (window + S)) tiles
rather than T^2. On CUDA both ``create_block_mask`` and ``flex_attention`` are compiled (default
Inductor settings, no max-autotune, so launch configs do not depend on timing). On CPU,
FlexAttention runs eagerly (the unfused reference that materialises the T x (T + S) scores) and has
no backward: that is only good for the forward test against the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.attention.ref import (
    ChunkSummaries,
    _check_inputs,
    _summary_eligible,
    document_ids,
)
from kernels.backends import load_backend_function

_compiled: dict[str, Callable] = {}


def _flex_functions(device: torch.device) -> tuple[Callable, Callable]:
    """(create_block_mask, flex_attention), compiled once per process on CUDA, eager elsewhere."""
    module = "torch.nn.attention.flex_attention"
    flex_attention = load_backend_function("attention", "flex", module, "flex_attention")
    create_block_mask = load_backend_function("attention", "flex", module, "create_block_mask")
    if device.type != "cuda":
        return create_block_mask, flex_attention
    if not _compiled:
        _compiled["mask"] = torch.compile(create_block_mask)
        _compiled["attn"] = torch.compile(flex_attention, dynamic=False)
    return _compiled["mask"], _compiled["attn"]


def sga_mask_mod(
    summaries: ChunkSummaries | None, doc: torch.Tensor, window: int, n_global: int
) -> Callable:
    """The SGA visibility rule as a FlexAttention ``mask_mod`` over keys ``[tokens, summaries]``.

    Args:
        summaries: summary tokens sorted by end per row, or None (local window only).
        doc: [b, T] canonical document ids (``document_ids``).
        window: local causal window in tokens, the query included.
        n_global: at most this many summaries per query.

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for ``kv_idx`` in ``[0, T + S)``. Indices are
        clamped before every lookup, so padded tiles never read out of bounds.
    """
    T = doc.shape[1]

    def local(b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        same_doc = doc[b, kv.clamp(max=T - 1)] == doc[b, q]
        return (kv < T) & (kv <= q) & (q - kv < window) & same_doc

    if summaries is None or n_global == 0 or summaries.end.shape[1] == 0:
        return lambda b, h, q_idx, kv_idx: local(b, q_idx.clamp(max=T - 1), kv_idx)

    S = summaries.end.shape[1]
    end = summaries.end
    eligible, doc_end = _summary_eligible(summaries, doc)
    ecount = F.pad(eligible.long().cumsum(dim=1), (1, 0))  # [b, S+1] eligible before index j
    bound = (torch.arange(T, device=doc.device) - window).expand(doc.shape[0], T).contiguous()
    hi = torch.searchsorted(end.contiguous(), bound, right=True)  # [b, T]
    e_hi = ecount.gather(1, hi)  # [b, T] eligible summaries ending at or before t - window

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        q = q_idx.clamp(max=T - 1)
        j = (kv_idx - T).clamp(0, S - 1)
        summary = (
            (kv_idx >= T)
            & (end[b, j] <= q - window)
            & eligible[b, j]
            & (doc_end[b, j] == doc[b, q])
            & (e_hi[b, q] - ecount[b, j] <= n_global)
        )
        return local(b, q, kv_idx) | summary

    return mask_mod


def sparse_global_attention_flex(
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
    """Sparse global attention (the op of ``kernels/attention/ref.py``) with FlexAttention.

    Args:
        q: [b, T, H, K] queries.
        k, v: [b, T, Hkv, K] keys and values (Hkv divides H).
        summaries: summary tokens sorted by ``end`` per row, or ``None`` (local attention only).
        window: local causal window in tokens, the query included.
        n_global: at most this many summaries per query (the most recent candidates).
        seq_idx: [b, T] document numbers of packed rows, ``None``: one document per row.
        scale: score scale, default ``K ** -0.5``.

    Returns:
        [b, T, H, K] in q's dtype. Scores are computed in q's dtype with fp32 softmax statistics
        (FlexAttention's own accumulation), not upcast to fp32 like the blocked CPU path.
    """
    _check_inputs(q, k, v, window, n_global)
    b, T, _, K = q.shape
    scale = K**-0.5 if scale is None else scale
    doc = document_ids(seq_idx, b, T, q.device)
    keys, values = k, v
    if summaries is not None and n_global > 0 and summaries.end.shape[1] > 0:
        ends = summaries.end
        if ends.shape[1] > 1:  # checked on the device: no host sync
            torch._assert_async(
                (ends[:, 1:] >= ends[:, :-1]).all(), "summaries must be sorted by end"
            )
        keys = torch.cat([k, summaries.k.to(k.dtype)], dim=1)
        values = torch.cat([v, summaries.v.to(v.dtype)], dim=1)
    else:
        summaries = None
    return flex_over_keys(q, keys, values, sga_mask_mod(summaries, doc, window, n_global), scale)


def flex_over_keys(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask_mod: Callable, scale: float
) -> torch.Tensor:
    """FlexAttention of q [b, T, H, K] over keys/values [b, T', Hkv, K] (the row's tokens and
    whatever the op appends to them) under ``mask_mod`` -> [b, T, H, K] in q's dtype."""
    b, T, H, _ = q.shape
    create_block_mask, flex_attention = _flex_functions(q.device)
    block_mask = create_block_mask(mask_mod, b, None, T, keys.shape[1], device=q.device)
    out = flex_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=keys.shape[2] != H,
    )
    return out.transpose(1, 2).to(q.dtype)
