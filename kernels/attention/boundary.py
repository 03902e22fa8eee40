"""Chunk-boundary attention (Attamba): a leading window at full resolution plus the last token of
every earlier chunk, whose key and value carry the state of its whole chunk.

Shape legend: b batch, T time, H query heads, Hkv key/value heads (g = H / Hkv), K head dim,
S boundary slots per row.

The op. Documents are cut into chunks of P tokens: in each document a chunk starts at
position-in-document 0 and at every ``offset + j P`` (j >= 0; ``offset`` in [0, P), so with a
nonzero offset a document's first chunk holds ``offset`` tokens; "cyclic" chunking gives each
layer its own offset). No chunk crosses a document boundary, so a packed document is chunked
exactly as it would be alone. Query t sees key s of its own document, s <= t, when

* ``t - s < leading`` (the leading window, the query included), or
* s is the last token of its chunk (a *boundary*) and ``s <= t - leading``.

A boundary inside the window is seen once, as a window key. The leading window covers the
tokens of the query's chunk that no boundary summarises yet (when ``leading >= P``, all of them).

Boundary slots. Only boundaries that some later query of their document can see (``s + leading``
in the same document and the row) are kept, compacted in position order into ``S`` slots. ``S``
is a bound computed from T, P, the offset and ``leading`` alone (``boundary_slot_bound``), so
every batch of a length has the same shapes (no host sync, one compiled kernel per length); the
unused slots are masked. The bound: each kept boundary either ends a full P-token chunk lying in
the row (disjoint, at most T // P), or ends a document's short first chunk of ``offset`` tokens,
and then its document holds at least ``offset + leading`` tokens of the row (at most
``T // (offset + leading)`` of those), or ends the short chunk a row begins with when its first
document started before the row (``doc_pos[:, 0] > 0``; at most one).

CPU algorithm (``boundary_attention``), never a T x T tensor: the window part is the blocked
local attention of ``kernels.attention.ref``; the boundary part attends query groups to the
slots they may need (slot j can hold a boundary visible to queries <= t1 only if
j < ``boundary_slot_bound`` of the prefix, a static count) and builds its mask from the slots'
positions and documents on the fly, forward and backward, so nothing of size T * S is saved.
The two are merged by log-sum-exp. Work is O(T * (leading + T / P)); the largest tensor is
linear in T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels.attention import ref as _ref
from kernels.attention.ref import (
    _BACK_PAD_DOC,
    _FRONT_PAD_DOC,
    _local_part,
    _merge_parts,
    _Part,
    document_ids,
)


class BoundarySlots(NamedTuple):
    """The boundary tokens of a batch, compacted into a fixed number of slots per row.

    Attributes:
        index: [b, S] int64 row position of each slot's boundary (clamped into the row; read
            ``pos`` to know whether a slot is used).
        pos: [b, S] int64 row position, or T for an unused slot (never visible).
        doc: [b, S] int64 canonical document id (``document_ids``) of each slot, -1 if unused.
    """

    index: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor


def boundary_slot_bound(length: int, chunk: int, offset: int, leading: int) -> int:
    """The most boundary slots a row of ``length`` tokens can need (see the module docstring)."""
    full = length // chunk
    short_first = length // (offset + leading) if offset > 0 else 0
    return full + short_first + 1  # + 1: the row's own first chunk, if it continues a document


def _check_chunking(chunk: int, offset: int, leading: int) -> None:
    if chunk < 1 or not 0 <= offset < chunk or leading < 1:
        raise ValueError(
            f"need chunk >= 1, 0 <= offset < chunk and leading >= 1; got chunk={chunk},"
            f" offset={offset}, leading={leading}"
        )


def chunk_starts(doc_pos: torch.Tensor, chunk: int, offset: int) -> torch.Tensor:
    """[b, T] bool: a chunk starts here (position-in-document 0, or ``offset + j * chunk``)."""
    return (doc_pos == 0) | ((doc_pos >= offset) & ((doc_pos - offset) % chunk == 0))


def chunk_ids(doc_pos: torch.Tensor, chunk: int, offset: int) -> torch.Tensor:
    """[b, T] int64 chunk number of each position, 0, 1, ... along the row: as ``seq_idx`` it
    makes a scan restart at every chunk (and document) start."""
    return chunk_starts(doc_pos, chunk, offset).long().cumsum(dim=1)


def boundary_slots(
    doc_pos: torch.Tensor,
    seq_idx: torch.Tensor | None,
    *,
    chunk: int,
    offset: int,
    leading: int,
) -> BoundarySlots:
    """The kept boundaries of each row in ``boundary_slot_bound`` slots, in position order.

    Args:
        doc_pos: [b, T] position of each token inside its document.
        seq_idx: [b, T] document numbers of packed rows, None: one document per row.
        chunk, offset, leading: the chunking and the leading window (module docstring).
    """
    _check_chunking(chunk, offset, leading)
    b, T = doc_pos.shape
    device = doc_pos.device
    doc = document_ids(seq_idx, b, T, device)
    n_slots = boundary_slot_bound(T, chunk, offset, leading)
    starts = chunk_starts(doc_pos, chunk, offset)
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]  # the last token of a chunk is followed by a chunk start
    seen_later = torch.zeros_like(starts)  # some query s + leading of the same document exists
    if leading < T:
        seen_later[:, : T - leading] = doc[:, leading:] == doc[:, : T - leading]
    kept = ends & seen_later
    slot = kept.long().cumsum(dim=1) - 1
    # positions that are not kept go to a spare column, dropped afterwards
    target = torch.where(kept, slot, torch.full_like(slot, n_slots))
    position = torch.arange(T, device=device).expand(b, T)
    pos = torch.full((b, n_slots + 1), T, dtype=torch.long, device=device)
    pos = pos.scatter(1, target, position)[:, :n_slots]
    slot_doc = torch.full((b, n_slots + 1), -1, dtype=torch.long, device=device)
    slot_doc = slot_doc.scatter(1, target, doc)[:, :n_slots]
    return BoundarySlots(index=pos.clamp(max=T - 1), pos=pos, doc=slot_doc)


def gather_slots(x: torch.Tensor, slots: BoundarySlots) -> torch.Tensor:
    """x [b, T, ...] at the slots' positions -> [b, S, ...] (differentiable)."""
    b, S = slots.index.shape
    idx = slots.index.view(b, S, *([1] * (x.dim() - 2))).expand(b, S, *x.shape[2:])
    return x.gather(1, idx)


def _slot_mask(
    slots: BoundarySlots, doc: torch.Tensor, t0: int, t1: int, hi: int, leading: int
) -> torch.Tensor:
    """[b, t1 - t0, 1, 1, hi] bool: query t in [t0, t1) sees slot j < hi."""
    t = torch.arange(t0, t1, device=doc.device)
    pos, slot_doc = slots.pos[:, None, :hi], slots.doc[:, None, :hi]
    mask = (pos <= (t - leading)[None, :, None]) & (slot_doc == doc[:, t0:t1, None])
    return mask[:, :, None, None, :]


def _slot_scores(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(q k^T - m) masked [b, t, Hkv, g, s] and its row max m [b, t, Hkv, g, 1] (-inf: the
    row sees no slot). No autograd: updated in place."""
    scores = torch.einsum("bthgk,bshk->bthgs", q, k)
    scores.masked_fill_(~mask, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = scores.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp_()
    return p, m


def _query_groups(
    b: int, T: int, heads: int, n_slots: int, chunk: int, offset: int, leading: int
) -> list[tuple[int, int, int]]:
    """(t0, t1, hi): query rows [t0, t1) attend to slots [0, hi); the scores of a group fit the
    budget. hi is the slot bound of the prefix the group's last query can see."""
    rows = max(1, _ref._SCORE_ELEMS_PER_GROUP // max(1, b * heads * n_slots))
    groups = []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        seen = t1 - leading  # positions 0 .. t1 - 1 - leading can be seen by queries < t1
        full = max(0, seen) // chunk
        short_first = t1 // (offset + leading) if offset > 0 else 0
        hi = min(n_slots, full + short_first + 1)  # + 1 as in boundary_slot_bound
        if hi > 0:
            groups.append((t0, t1, hi))
    return groups


class _SlotAttention(torch.autograd.Function):
    """Unnormalised attention of every query over the boundary slots it may see (flash style:
    scores built a query group at a time, recomputed in backward, mask rebuilt from the slots)."""

    @staticmethod
    def forward(ctx, q, k_s, v_s, slots, doc, leading, groups):
        b, T, hkv, g, _ = q.shape
        num = q.new_zeros(b, T, hkv, g, v_s.shape[-1])
        den = q.new_zeros(b, T, hkv, g, 1)
        m = q.new_full((b, T, hkv, g, 1), float("-inf"))
        for t0, t1, hi in groups:
            mask = _slot_mask(slots, doc, t0, t1, hi, leading)
            p, m[:, t0:t1] = _slot_scores(q[:, t0:t1], k_s[:, :hi], mask)
            num[:, t0:t1] = torch.einsum("bthgs,bshk->bthgk", p, v_s[:, :hi])
            den[:, t0:t1] = p.sum(dim=-1, keepdim=True)
            del p
        ctx.save_for_backward(q, k_s, v_s, *slots, doc)
        ctx.leading, ctx.groups = leading, groups
        ctx.mark_non_differentiable(m)
        return num, den, m

    @staticmethod
    @once_differentiable
    def backward(ctx, g_num, g_den, _g_m):
        q, k_s, v_s, index, pos, slot_doc, doc = ctx.saved_tensors
        slots = BoundarySlots(index, pos, slot_doc)
        g_q, g_k, g_v = torch.zeros_like(q), torch.zeros_like(k_s), torch.zeros_like(v_s)
        for t0, t1, hi in ctx.groups:
            qg, kg, vg, gn = q[:, t0:t1], k_s[:, :hi], v_s[:, :hi], g_num[:, t0:t1]
            p, _ = _slot_scores(qg, kg, _slot_mask(slots, doc, t0, t1, hi, ctx.leading))
            g_v[:, :hi] += torch.einsum("bthgs,bthgk->bshk", p, gn)
            # d(score) = p * (dnum . v + dden); masked entries have p = 0
            g_s = torch.einsum("bthgk,bshk->bthgs", gn, vg).add_(g_den[:, t0:t1]).mul_(p)
            del p
            g_q[:, t0:t1] = torch.einsum("bthgs,bshk->bthgk", g_s, kg)
            g_k[:, :hi] += torch.einsum("bthgs,bthgk->bshk", g_s, qg)
            del g_s
        return g_q, g_k, g_v, None, None, None, None


def _to_tokens(part: _Part, T: int) -> _Part:
    """A blocked part [b, n, Hkv, g, W, X] in token layout [b, T, Hkv, g, X]."""

    def flat(x: torch.Tensor) -> torch.Tensor:
        b, n, hkv, g, w, d = x.shape
        return x.permute(0, 1, 4, 2, 3, 5).reshape(b, n * w, hkv, g, d)[:, :T]

    return _Part(flat(part.num), flat(part.den), flat(part.m))


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_pos: torch.Tensor) -> None:
    """Shapes of the op's inputs (shared by every backend)."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"expected q [b,T,H,K], k/v [b,T,Hkv,K]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}")
    if tuple(doc_pos.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"doc_pos must be [b, T] = {tuple(q.shape[:2])}, got {tuple(doc_pos.shape)}"
        )


def boundary_attention(
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
    """Chunk-boundary attention, blocked CPU algorithm (the op of the module docstring).

    Args:
        q: [b, T, H, K] queries.
        k, v: [b, T, Hkv, K] keys and values of every position (a boundary's are its chunk's).
        doc_pos: [b, T] position of each token inside its document.
        seq_idx: [b, T] document numbers of packed rows, None: one document per row.
        chunk: P, tokens per chunk.
        offset: where in each document the regular chunk grid starts, 0 <= offset < P.
        leading: the leading window in tokens, the query included (>= 1).
        scale: score scale, default ``K ** -0.5``.

    Returns:
        [b, T, H, K] in q's dtype; the softmax runs in fp32 (fp64 for fp64 inputs), autocast off.
    """
    check_inputs(q, k, v, doc_pos)
    _check_chunking(chunk, offset, leading)
    b, T, H, K = q.shape
    hkv = k.shape[2]
    scale = K**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    doc = document_ids(seq_idx, b, T, q.device)
    slots = boundary_slots(doc_pos, seq_idx, chunk=chunk, offset=offset, leading=leading)
    blk = min(leading, T)
    n = -(-T // blk)
    with torch.autocast(q.device.type, enabled=False):
        pad = n * blk - T
        q_s = q.to(dtype) * scale
        q_blk = F.pad(q_s, (0, 0, 0, 0, 0, pad)).view(b, n, blk, hkv, H // hkv, K)
        k_p = F.pad(k.to(dtype), (0, 0, 0, 0, 0, pad))
        v_p = F.pad(v.to(dtype), (0, 0, 0, 0, 0, pad))
        doc_pad = F.pad(F.pad(doc, (0, pad), value=_BACK_PAD_DOC), (blk, 0), value=_FRONT_PAD_DOC)
        local = _to_tokens(_local_part(q_blk, k_p, v_p, doc_pad, leading, blk), T)
        n_slots = slots.pos.shape[1]
        groups = _query_groups(b, T, H, n_slots, chunk, offset, leading)
        glob = None
        if groups:
            k_slots = gather_slots(k.to(dtype), slots)
            v_slots = gather_slots(v.to(dtype), slots)
            q_tok = q_s.view(b, T, hkv, H // hkv, K)
            glob = _Part(
                *_SlotAttention.apply(q_tok, k_slots, v_slots, slots, doc, leading, groups)
            )
        out = _merge_parts(local, glob)  # [b, T, Hkv, g, K]
    return out.reshape(b, T, H, K).to(q.dtype)
