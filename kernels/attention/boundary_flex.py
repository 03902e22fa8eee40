"""Chunk-boundary attention (``kernels/attention/boundary.py``) with FlexAttention.

Shape legend: b batch, T time, H query heads, Hkv key/value heads, K head dim, S boundary slots.

Keys and values are the T tokens followed by the S boundary slots of the row. The ``mask_mod``
states the op's rule: key s < T is seen when ``t - leading < s <= t`` in t's document; key
T + j (slot j) when its boundary lies at or before ``t - leading`` in t's document. S is the
static ``boundary_slot_bound`` of T, so the key length never changes with document packing and
one compiled kernel serves every batch of a length. The ``BlockMask`` (128 x 128 tiles) skips
the tiles outside the leading band and the slot columns: O(T * (leading + S)) work, not T^2.
On CPU FlexAttention runs eagerly, forward only (tests compare it with the blocked path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.attention.boundary import BoundarySlots, boundary_slots, check_inputs, gather_slots
from kernels.attention.flex import flex_over_keys
from kernels.attention.ref import document_ids


def boundary_mask_mod(slots: BoundarySlots, doc: torch.Tensor, leading: int) -> Callable:
    """``mask_mod(b, h, q_idx, kv_idx) -> bool`` over keys ``[tokens, slots]`` (indices clamped
    before every lookup, so padded tiles never read out of bounds)."""
    T, S = doc.shape[1], slots.pos.shape[1]

    def local(b: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        s = kv.clamp(max=T - 1)
        return (kv < T) & (kv <= q) & (q - kv < leading) & (doc[b, s] == doc[b, q])

    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        q = q_idx.clamp(max=T - 1)
        j = (kv_idx - T).clamp(0, S - 1)
        slot = (kv_idx >= T) & (slots.pos[b, j] <= q - leading) & (slots.doc[b, j] == doc[b, q])
        return local(b, q, kv_idx) | slot

    if S == 0:  # no slot to index: the leading window alone
        return lambda b, h, q_idx, kv_idx: local(b, q_idx.clamp(max=T - 1), kv_idx)
    return mask_mod


def boundary_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    chunk: int,
    offset: int = 0,
    leading: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Chunk-boundary attention with FlexAttention; arguments as in ``boundary_attention``.

    Returns:
        [b, T, H, K] in q's dtype (scores in q's dtype with FlexAttention's fp32 softmax
        statistics, not upcast like the blocked path).
    """
    check_inputs(q, k, v, doc_pos)
    b, T, _, K = q.shape
    slots = boundary_slots(doc_pos, seq_idx, chunk=chunk, offset=offset, leading=leading)
    doc = document_ids(seq_idx, b, T, q.device)
    keys = torch.cat([k, gather_slots(k, slots)], dim=1)
    values = torch.cat([v, gather_slots(v, slots)], dim=1)
    mask_mod = boundary_mask_mod(slots, doc, leading)
    return flex_over_keys(q, keys, values, mask_mod, K**-0.5 if scale is None else scale)
