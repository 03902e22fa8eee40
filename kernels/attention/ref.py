"""Sparse global attention (SGA): a local causal window plus summary tokens of earlier chunks.

Shape legend: b batch, T time, H query heads, Hkv key/value heads (GQA: Hkv divides H, each kv
head serves g = H / Hkv query heads), K head dim, S summaries per row, n query blocks, W block
length, G' summaries gathered per query block.

The op (``sparse_global_attention_dense_ref`` defines it). Query t attends, in one softmax, to

* the local window: keys s with ``t - window < s <= t`` of t's own document, and
* summary tokens: summary j (a key/value pair standing for the positions
  ``summary_start[j] .. summary_end[j]``) is a *candidate* for t when
  (1) ``summary_end[j] <= t - window``: the summary ends before the window begins, so it is causal
      and never double counts a token of the window;
  (2) ``summary_start[j]`` and ``summary_end[j]`` lie in t's document: nothing of an earlier
      document, and no chunk that crosses a document boundary, is ever seen;
  of its candidates, t keeps the ``n_global`` most recent (largest index j).

Consequence of (1): the tokens between the end of the last visible summary and the start of the
window (fewer than one chunk) are seen neither locally nor through a summary. Letting a summary
overlap the window would double count up to a chunk of tokens instead; a gap of < summary_chunk
tokens behind a window of w >> summary_chunk tokens is the cheaper compromise.

Summaries are computed by the caller (``build_chunk_summaries`` pools document-aligned chunks); the
op only needs, per row, summaries sorted by ``summary_end``. Padding entries carry
``summary_end >= T - 1`` (never visible, keeps the order).

CPU algorithm (``sparse_global_attention``), O(T * (window + n_global)) time and memory, never a
T x T matrix: T is split into blocks of W = min(window, T) queries; block n attends, in one
softmax, to key blocks n-1 and n (masked to the window and document) followed by the
G' <= n_global + (summaries ending inside the block) summaries it can need, gathered per block.
The blocks are the batch of one ``F.scaled_dot_product_attention`` call with a mask; on CPU that
is the flash kernel, which tiles the scores and recomputes them in its backward, so nothing of
size T * (window + n_global) * H is kept between forward and backward.

``_local_part`` / ``_summary_part`` / ``_merge_parts`` compute the two key sets as separate
unnormalised parts merged by log-sum-exp, a group of blocks at a time under a fixed score budget
(``_SCORE_ELEMS_PER_GROUP``); the ``flash_attn`` backend and ``boundary.py`` build on them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels.attention.cpu_flash import additive_mask, attend_rebuilding_inputs, runs_on_cpu_flash

# document ids given to padding positions (real documents are numbered 0, 1, ...)
_FRONT_PAD_DOC = -1
_BACK_PAD_DOC = -2
_NO_DOC = -3  # document of summaries no query may see (matches no query's document)


class ChunkSummaries(NamedTuple):
    """Summary tokens of one batch, sorted by ``end`` within each row.

    Attributes:
        k: [b, S, Hkv, K] summary keys.
        v: [b, S, Hkv, K] summary values.
        start: [b, S] int64, first position (in the row) each summary covers.
        end: [b, S] int64, last position each summary covers; padding entries hold T.
        doc: [b, S] int64 document id of each summary in the numbering of ``document_ids``
            of the query rows, or None: looked up at ``start`` and ``end``. Given when the
            summaries cover positions outside the rows (a context-parallel slice sees summaries
            of earlier slices at negative positions); then an entry is eligible when
            ``start <= end < T``.
    """

    k: torch.Tensor
    v: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    doc: torch.Tensor | None = None


def document_ids(
    seq_idx: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Canonical document number of each position, 0, 1, ... per row: [b, T] int64.

    Any change of ``seq_idx`` along T starts a new document (so the ids of the caller need not be
    contiguous or non-negative). ``None``: one document per row.
    """
    if seq_idx is None:
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def chunk_layout(
    doc_pos: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Document-aligned chunks of ``chunk`` tokens: a chunk starts wherever ``doc_pos % chunk == 0``.

    Args:
        doc_pos: [b, T] position of each token inside its document.
        chunk: tokens per chunk.

    Returns:
        seg [b, T] chunk index of each position; start, end [b, S] first and last position of
        each chunk (S the most chunks of any row; padding entries hold start = end = T).
    """
    b, T = doc_pos.shape
    pos = torch.arange(T, device=doc_pos.device).expand(b, T)
    seg = (doc_pos % chunk == 0).long().cumsum(dim=1) - 1  # [b, T] chunk index within the row
    n_seg = int(seg[:, -1].max().item()) + 1
    start = torch.full((b, n_seg), T, dtype=torch.long, device=doc_pos.device)
    start = start.scatter_reduce(1, seg, pos, reduce="amin")
    end = torch.full((b, n_seg), -1, dtype=torch.long, device=doc_pos.device)
    end = end.scatter_reduce(1, seg, pos, reduce="amax")
    return seg, start, end.masked_fill(end < 0, T)


def pool_chunk_sums(x: torch.Tensor, seg: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Sums of ``x`` [b, T, ...] over chunk indices ``seg`` [b, T] -> [b, n_seg, ...] in fp32 or
    wider (partial sums when ``x`` is a slice of the row ``seg`` was numbered on)."""
    b, T = seg.shape
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    flat_idx = (seg + torch.arange(b, device=x.device)[:, None] * n_seg).reshape(-1)
    src = x.reshape(b * T, -1).to(acc_dtype)
    total = torch.zeros(b * n_seg, src.shape[1], dtype=acc_dtype, device=x.device)
    return total.index_add(0, flat_idx, src).view(b, n_seg, *x.shape[2:])


def build_chunk_summaries(
    k: torch.Tensor, v: torch.Tensor, chunk: int, doc_pos: torch.Tensor | None = None
) -> ChunkSummaries:
    """Mean-pool keys and values over document-aligned chunks of ``chunk`` tokens.

    A chunk starts at every position whose position-in-document is a multiple of ``chunk``, so a
    document packed at any offset of a row gets exactly the chunks it would get alone, and no chunk
    crosses a document boundary. The last chunk of a document may be shorter; it ends at the
    document's last token, so the visibility rule of the op never shows it (only later documents
    could see it, and they are masked).

    Args:
        k: [b, T, Hkv, K] keys (as they should be pooled, e.g. after RoPE).
        v: [b, T, Hkv, K] values.
        chunk: tokens per summary.
        doc_pos: [b, T] int position of each token inside its document; ``None``: ``arange(T)``.

    Returns:
        ChunkSummaries with S = the largest number of chunks of any row; k/v pooled in fp32 (or
        fp64) and cast back to the input dtype.
    """
    b, T = k.shape[:2]
    if doc_pos is None:
        doc_pos = torch.arange(T, device=k.device).expand(b, T)
    seg, start, end = chunk_layout(doc_pos, chunk)
    count = (end - start + 1).clamp_min(1)[:, :, None, None]

    def pool(x: torch.Tensor) -> torch.Tensor:
        return (pool_chunk_sums(x, seg, start.shape[1]) / count).to(x.dtype)

    return ChunkSummaries(pool(k), pool(v), start, end)


def continued_chunk_ends(doc_pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Last positions of the full chunks whose document goes on after them: [b, (T - 1) // chunk]
    int64 in increasing order, T in unused slots. No host sync; the shape depends on T only.

    A chunk starts wherever ``doc_pos % chunk == 0``; one whose document continues at the next
    position is full (rows start at a chunk start) and ends before T - 1, so at most
    (T - 1) // chunk fit in a row. These are the chunks a later token of their own document can
    see (a summary) or read the effect of (a workspace write); a document's last chunk never is.
    """
    b, T = doc_pos.shape
    n_slots = max(T - 1, 0) // chunk
    pos = torch.arange(T, device=doc_pos.device)
    # position e ends such a chunk: its document goes on at e + 1 with a new chunk there
    ends_chunk = (
        (doc_pos[:, 1:] == doc_pos[:, :-1] + 1)
        & (doc_pos[:, 1:] % chunk == 0)
        & (pos[None, : T - 1] >= chunk - 1)
    )  # [b, T-1]
    slot = torch.where(ends_chunk, ends_chunk.long().cumsum(dim=1) - 1, n_slots)
    end = torch.full((b, n_slots + 1), T, dtype=torch.long, device=doc_pos.device)
    return end.scatter(1, slot, pos[None, : T - 1].expand(b, -1).contiguous())[:, :n_slots]


def visible_chunk_summaries(
    k: torch.Tensor, v: torch.Tensor, chunk: int, doc_pos: torch.Tensor
) -> ChunkSummaries:
    """The summaries of ``build_chunk_summaries`` that some query can see, in a batch-independent
    shape: S = (T - 1) // chunk slots, whatever the packing (static shapes for compiled kernels,
    no host sync).

    A chunk can be seen only if its document goes on after it (a document's last chunk ends at
    its last token, before any query of that document could see it). Such a chunk is full
    (``chunk`` tokens) and ends before T - 1, so at most (T - 1) // chunk of them fit in a row;
    unused slots are padding (start = end = T, never visible). Rows must start at a chunk start
    (``doc_pos[:, 0] % chunk == 0``, as in ``build_chunk_summaries``); every real entry is
    eligible, which lets the blocked op use ``summary_block_width``.

    Args:
        k, v: [b, T, Hkv, K] keys and values.
        chunk: tokens per summary.
        doc_pos: [b, T] position of each token inside its document.

    Returns:
        ChunkSummaries with S = (T - 1) // chunk, sorted by end; k/v pooled in fp32 (or fp64)
        and cast back to the input dtype.
    """
    b, T = doc_pos.shape
    n_slots = max(T - 1, 0) // chunk
    end = continued_chunk_ends(doc_pos, chunk)
    valid = end < T
    start = torch.where(valid, end - (chunk - 1), T)
    covered = start.clamp(max=T - chunk)[:, :, None] + torch.arange(chunk, device=k.device)
    # whole rows of [b * T, Hkv * K] by index_select (its backward: index_add of rows), not an
    # element-wise gather over an expanded index
    rows_index = (covered + T * torch.arange(b, device=k.device)[:, None, None]).flatten()

    def pool(x: torch.Tensor) -> torch.Tensor:  # [b, T, Hkv, K] -> [b, S, Hkv, K]
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        rows = acc.reshape(b * T, -1).index_select(0, rows_index)
        rows = rows.view(b, n_slots, chunk, *x.shape[2:])
        mean = rows.mean(dim=2) * valid[:, :, None, None].to(acc.dtype)
        return mean.to(x.dtype)

    return ChunkSummaries(pool(k), pool(v), start, end)


def summary_block_width(n_global: int, block: int, chunk: int) -> int:
    """The most summaries a query block of ``block`` tokens can need from
    ``visible_chunk_summaries`` (all eligible, at least ``chunk`` positions apart): its first
    query's ``n_global`` plus those ending within the block's span."""
    return n_global + (block - 1) // chunk + 1


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, n_global: int
) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"expected q [b,T,H,K], k/v [b,T,Hkv,K]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}")
    if window < 1 or n_global < 0:
        raise ValueError(f"need window >= 1 and n_global >= 0, got {window}, {n_global}")


def _summary_eligible(
    summaries: ChunkSummaries, doc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per summary: may it be seen at all ([b, S] bool), and its document id ([b, S])."""
    T = doc.shape[1]
    start, end = summaries.start, summaries.end
    if summaries.doc is not None:
        return (start <= end) & (end < T), summaries.doc
    doc_end = doc.gather(1, end.clamp(0, T - 1))
    doc_start = doc.gather(1, start.clamp(0, T - 1))
    eligible = (end < T) & (start >= 0) & (start <= end) & (doc_start == doc_end)
    return eligible, doc_end


# ---------------------------------------------------------------------------------------------
# dense reference: defines the op
# ---------------------------------------------------------------------------------------------


def summary_visibility_dense(
    summaries: ChunkSummaries, doc: torch.Tensor, window: int, n_global: int
) -> torch.Tensor:
    """[b, T, S] bool: summary j is among the ``n_global`` most recent candidates of query t."""
    T = doc.shape[1]
    eligible, doc_end = _summary_eligible(summaries, doc)
    t = torch.arange(T, device=doc.device)
    candidate = (
        eligible[:, None, :]
        & (doc_end[:, None, :] == doc[:, :, None])
        & (summaries.end[:, None, :] <= (t - window)[None, :, None])
    )
    # number of candidates at index >= j, counted from the most recent one backwards
    from_latest = candidate.long().flip(-1).cumsum(-1).flip(-1)
    return candidate & (from_latest <= n_global)


def sparse_global_attention_dense_ref(
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
    """The op, built the slow obvious way: a full T x (T + S) mask and one softmax. Tests only.

    Arguments as in ``sparse_global_attention``; returns [b, T, H, K].
    """
    _check_inputs(q, k, v, window, n_global)
    b, T, H, K = q.shape
    rep = H // k.shape[2]
    scale = K**-0.5 if scale is None else scale
    doc = document_ids(seq_idx, b, T, q.device)
    t = torch.arange(T, device=q.device)
    local = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)  # [T(query), T(key)]
    mask = local[None] & (doc[:, :, None] == doc[:, None, :])  # [b, T, T]
    keys, values = k, v
    if summaries is not None and n_global > 0:
        mask = torch.cat([mask, summary_visibility_dense(summaries, doc, window, n_global)], dim=-1)
        keys = torch.cat([k, summaries.k], dim=1)
        values = torch.cat([v, summaries.v], dim=1)
    keys = keys.repeat_interleave(rep, dim=2)
    values = values.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhk,bshk->bhqs", q, keys) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqs,bshk->bqhk", scores.softmax(dim=-1), values)


# ---------------------------------------------------------------------------------------------
# blocked CPU algorithm
# ---------------------------------------------------------------------------------------------


class _Part(NamedTuple):
    """One part of the keys of a query block, before normalisation (flash-attention style)."""

    num: torch.Tensor  # [b, n, Hkv, g, W, K] sum_s exp(score - m) v_s
    den: torch.Tensor  # [b, n, Hkv, g, W, 1] sum_s exp(score - m)
    m: torch.Tensor  # [b, n, Hkv, g, W, 1] row max (no gradient); -inf where the row sees nothing


def _exp_scores(
    q_blk: torch.Tensor, k_blk: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(q k^T - m) masked [b, n, Hkv, g, W, L] and the row max m [.., W, 1] (-inf: empty row).

    Runs without autograd, so the one [.., W, L] tensor is updated in place.
    """
    scores = torch.einsum("bnwhgk,bnlhk->bnhgwl", q_blk, k_blk)
    scores.masked_fill_(~mask[:, :, None, None], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = scores.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp_()
    return p, m


# Scores are materialised for groups of query blocks of at most this many elements, so the
# transient memory of one call is bounded (16 MiB in fp32) whatever T is.
_SCORE_ELEMS_PER_GROUP = 1 << 22


def _block_groups(q_blk: torch.Tensor, n_keys: int) -> list[slice]:
    """Slices of the block dim (1) whose scores [b, n', Hkv, g, W, L] fit the group budget."""
    b, n, w, hkv, g, _ = q_blk.shape
    per_block = b * w * hkv * g * n_keys
    step = max(1, _SCORE_ELEMS_PER_GROUP // max(per_block, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


class _BlockAttention(torch.autograd.Function):
    """Unnormalised masked attention of query blocks over their key sets (flash-attention style).

    The [.., W, L] probabilities dominate memory: they are built a group of blocks at a time and
    recomputed in the backward instead of being saved, so the forward keeps only q, k, v and the
    boolean mask alive, and transient memory stays under a fixed budget.
    """

    @staticmethod
    def forward(ctx, q_blk, k_blk, v_blk, mask):
        b, n, w, hkv, g, _ = q_blk.shape
        num = q_blk.new_empty(b, n, hkv, g, w, v_blk.shape[-1])
        den = q_blk.new_empty(b, n, hkv, g, w, 1)
        m = q_blk.new_empty(b, n, hkv, g, w, 1)
        for sl in _block_groups(q_blk, k_blk.shape[2]):
            p, m[:, sl] = _exp_scores(q_blk[:, sl], k_blk[:, sl], mask[:, sl])
            num[:, sl] = torch.einsum("bnhgwl,bnlhk->bnhgwk", p, v_blk[:, sl])
            den[:, sl] = p.sum(dim=-1, keepdim=True)
            del p  # before the next group allocates its scores
        ctx.save_for_backward(q_blk, k_blk, v_blk, mask)
        ctx.mark_non_differentiable(m)
        return num, den, m

    @staticmethod
    @once_differentiable
    def backward(ctx, g_num, g_den, _g_m):
        q_blk, k_blk, v_blk, mask = ctx.saved_tensors
        g_q, g_k, g_v = torch.empty_like(q_blk), torch.empty_like(k_blk), torch.empty_like(v_blk)
        for sl in _block_groups(q_blk, k_blk.shape[2]):
            q, k, v, gn = q_blk[:, sl], k_blk[:, sl], v_blk[:, sl], g_num[:, sl]
            p, _ = _exp_scores(q, k, mask[:, sl])
            g_v[:, sl] = torch.einsum("bnhgwl,bnhgwk->bnlhk", p, gn)
            # d(score) = p * (dnum . v + dden); masked entries have p = 0 and get no gradient
            g_s = torch.einsum("bnhgwk,bnlhk->bnhgwl", gn, v).add_(g_den[:, sl]).mul_(p)
            del p
            g_q[:, sl] = torch.einsum("bnhgwl,bnlhk->bnwhgk", g_s, k)
            g_k[:, sl] = torch.einsum("bnhgwl,bnwhgk->bnlhk", g_s, q)
            del g_s
        return g_q, g_k, g_v, None


def _attend_part(
    q_blk: torch.Tensor, k_blk: torch.Tensor, v_blk: torch.Tensor, mask: torch.Tensor
) -> _Part:
    """Masked attention of query blocks over their own key set, kept unnormalised.

    Args:
        q_blk: [b, n, W, Hkv, g, K] (already scaled).
        k_blk, v_blk: [b, n, L, Hkv, K].
        mask: [b, n, W, L] bool, True = visible.
    """
    return _Part(*_BlockAttention.apply(q_blk, k_blk, v_blk, mask))


def _merge_parts(a: _Part, b: _Part | None) -> torch.Tensor:
    """Log-sum-exp merge of two parts -> normalised output [b, n, Hkv, g, W, K].

    Part ``a`` (the local window) always has a finite max: every query sees at least itself.
    """
    if b is None:
        return a.num / a.den
    m = torch.maximum(a.m, b.m)
    alpha, beta = torch.exp(a.m - m), torch.exp(b.m - m)  # beta = 0 where b sees nothing
    return (alpha * a.num + beta * b.num) / (alpha * a.den + beta * b.den)


def _local_part(
    q_blk: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pad: torch.Tensor,
    window: int,
    blk: int,
) -> _Part:
    """Each query block attends to its own and the previous key block, masked to the window.

    Args:
        q_blk: [b, n, W, Hkv, g, K]; k, v: [b, n*W, Hkv, K] (padded at the back);
        doc_pad: [b, (n+1)*W] document ids of the positions -W .. n*W-1.
    """
    b, n = q_blk.shape[:2]
    kp = F.pad(k, (0, 0, 0, 0, blk, 0))  # one block of padding in front: "block -1"
    vp = F.pad(v, (0, 0, 0, 0, blk, 0))
    shape = (b, n, blk, *k.shape[2:])
    k_blk = torch.cat([kp[:, :-blk].reshape(shape), kp[:, blk:].reshape(shape)], dim=2)
    v_blk = torch.cat([vp[:, :-blk].reshape(shape), vp[:, blk:].reshape(shape)], dim=2)

    i = torch.arange(blk, device=k.device)
    j = torch.arange(2 * blk, device=k.device)
    rel = (i[:, None] + blk) - j[None, :]  # t - s for query i and key j of one block
    in_window = (rel >= 0) & (rel < window)  # [W, 2W]
    doc_q = doc_pad[:, blk:].reshape(b, n, blk)
    doc_k = torch.cat([doc_pad[:, :-blk].reshape(b, n, blk), doc_q], dim=2)  # [b, n, 2W]
    mask = in_window & (doc_q[..., :, None] == doc_k[..., None, :])
    return _attend_part(q_blk, k_blk, v_blk, mask)


def _summary_keys(
    summaries: ChunkSummaries,
    doc: torch.Tensor,
    window: int,
    n_global: int,
    n: int,
    blk: int,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The contiguous range of summaries each of the n query blocks of ``blk`` queries may need:
    keys, values [b, n, G', Hkv, K] and mask [b, n, W, G'] (True = visible); None if none can be.

    With summaries sorted by end, query t's candidates are among indices [0, hi(t)) with
    hi(t) = #{j: end_j <= t - window}; it keeps those with E[hi(t)] - E[j] <= n_global, E being the
    exclusive prefix count of eligible summaries. Both bounds grow with t, so block n needs only
    indices [first(t0), hi(t_last)): at most n_global + (summaries ending in the block) + ineligible.
    ``width`` fixes that count (``summary_block_width``; checked on the device, asynchronously);
    None measures it, which costs a host sync.
    """
    b, T, S = doc.shape[0], doc.shape[1], summaries.end.shape[1]
    if S == 0 or n_global == 0:
        return None
    eligible, doc_end = _summary_eligible(summaries, doc)
    ecount = F.pad(eligible.long().cumsum(dim=1), (1, 0))  # [b, S+1]

    t = torch.arange(n * blk, device=doc.device)
    bound = (t.clamp(max=T - 1) - window).expand(b, -1).contiguous()
    hi = torch.searchsorted(summaries.end.contiguous(), bound, right=True)  # [b, n*W]
    e_hi = ecount.gather(1, hi)  # [b, n*W]
    first = torch.searchsorted(
        ecount, (e_hi - n_global).view(b, n, blk)[:, :, 0].contiguous()
    )  # [b, n]
    last = hi.view(b, n, blk)[:, :, -1]
    if width is None:
        width = int((last - first).max().item())  # shape-defining: a host sync
        if width <= 0:
            return None
    else:
        width = min(width, S)
        torch._assert_async((last - first).max() <= width, "summary_width is too small")
    raw_idx = first[:, :, None] + torch.arange(width, device=doc.device)  # [b, n, G']
    idx = raw_idx.clamp(max=S - 1)  # clamped entries are masked below through raw_idx >= hi

    def gather(x: torch.Tensor) -> torch.Tensor:  # [b, S, ...] -> [b, n, G', ...]
        flat = idx.reshape(b, n * width)
        if x.dim() == 2:
            return x.gather(1, flat).view(b, n, width)
        picked = x.gather(1, flat.view(b, n * width, 1, 1).expand(-1, -1, *x.shape[2:]))
        return picked.view(b, n, width, *x.shape[2:])

    doc_q = F.pad(doc, (0, n * blk - T), value=_BACK_PAD_DOC).view(b, n, blk, 1)
    e_idx = ecount.gather(1, idx.reshape(b, -1)).view(b, n, 1, width)
    # three compares of [b, n, W, G'], each against a per-column and a per-row vector
    col_doc = torch.where(gather(eligible), gather(doc_end), _NO_DOC).view(b, n, 1, width)
    mask = raw_idx[:, :, None, :] < hi.view(b, n, blk, 1)
    mask &= col_doc == doc_q
    mask &= e_idx >= (e_hi - n_global).view(b, n, blk, 1)  # among the n_global most recent
    return gather(summaries.k), gather(summaries.v), mask


def _summary_part(
    q_blk: torch.Tensor,
    summaries: ChunkSummaries,
    doc: torch.Tensor,
    window: int,
    n_global: int,
    width: int | None = None,
) -> _Part | None:
    """Each query block [b, n, W, Hkv, g, K] attends to the summaries ``_summary_keys`` gathers
    for it."""
    n, blk = q_blk.shape[1:3]
    keys = _summary_keys(summaries, doc, window, n_global, n, blk, width)
    return None if keys is None else _attend_part(q_blk, *keys)


# ---------------------------------------------------------------------------------------------
# one masked softmax per query block (the ``torch`` backend's path)
# ---------------------------------------------------------------------------------------------


class _BlockKeys(torch.autograd.Function):
    """Keys (or values) of each query block in one tensor: [previous block, own block, extra].

    Written straight into one buffer; the backward adds the two block slices of the gradient
    back into place (pad + slices + cat zero-filled and copied the whole key gradient several
    times, a large share of the step next to the attention kernel).
    """

    @staticmethod
    def forward(ctx, x, extra, blk):
        b, n = x.shape[0], x.shape[1] // blk
        x_blk = x.reshape(b, n, blk, *x.shape[2:])
        n_extra = 0 if extra is None else extra.shape[2]
        out = x.new_empty(b, n, 2 * blk + n_extra, *x.shape[2:])
        out[:, :1, :blk].zero_()  # block -1: masked out, but must not hold NaN garbage
        out[:, 1:, :blk] = x_blk[:, :-1]
        out[:, :, blk : 2 * blk] = x_blk
        if extra is not None:
            out[:, :, 2 * blk :] = extra
        ctx.blk, ctx.has_extra = blk, extra is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        blk = ctx.blk
        g_x = g[:, :, blk : 2 * blk].clone()
        g_x[:, :-1] += g[:, 1:, :blk]
        g_extra = g[:, :, 2 * blk :] if ctx.has_extra else None
        return g_x.flatten(1, 2), g_extra, None


def _local_mask(doc: torch.Tensor, n: int, blk: int, window: int) -> torch.Tensor:
    """[b, n, W, 2W] bool: key j of block n's [previous, own] keys is visible to its query i.

    Document ids only grow along a row, so "same document" is "at or after the start of the
    query's document": visible iff max(t - window + 1, doc_start(t)) <= s <= t, two compares
    instead of building t - s and two document-id lookups per key. Padded queries (t >= T) are
    a document of their own starting at T.
    """
    b, T = doc.shape
    pos = torch.arange(n * blk, device=doc.device)
    new_doc = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)
    doc_start = torch.where(new_doc, pos[:T], 0).cummax(dim=1).values
    doc_start = F.pad(doc_start, (0, n * blk - T), value=T)  # [b, n*W]
    lo = torch.maximum(doc_start, pos - (window - 1))  # first visible key position
    # in block coordinates: key j of block n sits at (n - 1) W + j, query i at n W + i
    lo_rel = (lo.view(b, n, blk) - (pos.view(n, blk)[:, :1] - blk)).clamp(0, 2 * blk)
    j = torch.arange(2 * blk, device=doc.device, dtype=torch.int32)
    causal = j[None, :] <= torch.arange(blk, device=doc.device, dtype=torch.int32)[:, None] + blk
    return (j >= lo_rel.to(torch.int32)[..., None]) & causal


def _block_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor | None,
    extra_v: torch.Tensor | None,
    visible: torch.Tensor,
    *,
    blk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query block's keys and values [b*n, Hkv, L, K] (previous block, own block, its
    summaries) and the additive mask [b*n, 1, W, L] in k's dtype, from ``visible`` [b, n, W, L]."""
    b, n, _, n_keys = visible.shape
    hkv, K = k.shape[2:]
    mask = additive_mask(visible, k.dtype).view(b * n, 1, blk, n_keys)
    # [b*n, L, Hkv, K] seen as [b*n, Hkv, L, K]: the flash kernel reads this layout as is
    k_all = _BlockKeys.apply(k, extra_k, blk).view(b * n, n_keys, hkv, K).transpose(1, 2)
    v_all = _BlockKeys.apply(v, extra_v, blk).view(b * n, n_keys, hkv, K).transpose(1, 2)
    return k_all, v_all, mask


def _attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc: torch.Tensor,
    glob: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    window: int,
    blk: int,
    scale: float,
) -> torch.Tensor:
    """One masked softmax per query block over [its 2W local keys, its gathered summaries].

    The query blocks are the batch of one ``scaled_dot_product_attention`` call; on CPU that is
    the flash kernel (masked tiles, online softmax, a backward that recomputes the scores), so
    no score tensor outlives a tile and the two key sets need no log-sum-exp merge. Every row
    sees at least its own key (padded queries too), so no row is fully masked.

    Args:
        q: [b, n*W, H, K]; k, v: [b, n*W, Hkv, K] (padded at the back); doc: [b, T];
        glob: ``_summary_keys`` of the blocks, or None.

    Returns:
        [b, n*W, H, K].
    """
    b, n_pos, H, K = q.shape
    n, hkv = n_pos // blk, k.shape[2]
    visible = _local_mask(doc, n, blk, window)
    extra_k = extra_v = None
    if glob is not None:
        extra_k, extra_v, glob_mask = glob
        visible = torch.cat([visible, glob_mask], dim=-1)
    q_blocks = q.reshape(b * n, blk, H, K).transpose(1, 2)
    gqa = hkv != H
    if runs_on_cpu_flash(q_blocks, gqa):  # the gathers and the mask rebuilt in backward
        build = functools.partial(_block_inputs, blk=blk)
        out = attend_rebuilding_inputs(
            build, q_blocks, k, v, extra_k, extra_v, visible, scale=scale
        )
        return out.transpose(1, 2).reshape(b, n_pos, H, K)
    k_all, v_all, mask = _block_inputs(k, v, extra_k, extra_v, visible, blk=blk)
    if gqa and q.device.type != "cpu":
        # CUDA's masked (memory-efficient) kernel takes no GQA: SDPA would fall back to math
        k_all = k_all.repeat_interleave(H // hkv, dim=1)
        v_all = v_all.repeat_interleave(H // hkv, dim=1)
        gqa = False
    out = F.scaled_dot_product_attention(
        q_blocks,
        k_all,
        v_all,
        attn_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    )  # [b*n, H, W, K], laid out as [b*n, W, H, K]
    return out.transpose(1, 2).reshape(b, n_pos, H, K)


def sparse_global_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    summaries: ChunkSummaries | None,
    *,
    window: int,
    n_global: int,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
    summary_width: int | None = None,
) -> torch.Tensor:
    """Sparse global attention, blocked CPU algorithm in O(T * (window + n_global)).

    Args:
        q: [b, T, H, K] queries.
        k, v: [b, T, Hkv, K] keys and values (Hkv divides H).
        summaries: summary tokens sorted by ``end`` per row (see ``ChunkSummaries``), or ``None``
            for local attention only.
        window: local causal window in tokens, the query included.
        n_global: at most this many summaries per query (the most recent candidates).
        seq_idx: [b, T] document numbers of packed rows, ``None``: one document per row.
        scale: score scale, default ``K ** -0.5``.
        summary_width: the most summaries one query block (of min(window, T) queries) needs, for
            summaries of ``visible_chunk_summaries`` (``summary_block_width``): static shapes
            and no host sync. None measures it per call (any summaries).

    Returns:
        [b, T, H, K] in the dtype of ``q``; the softmax runs in fp32 (fp64 for fp64 inputs) with
        autocast off.
    """
    _check_inputs(q, k, v, window, n_global)
    b, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    blk = min(window, T)
    n = -(-T // blk)
    dtype = torch.promote_types(q.dtype, torch.float32)
    doc = document_ids(seq_idx, b, T, q.device)
    if summaries is not None and summaries.end.shape[1] > 1:
        # checked on the device: no host sync, so no stall and no graph break
        ends = summaries.end
        torch._assert_async((ends[:, 1:] >= ends[:, :-1]).all(), "summaries must be sorted by end")

    with torch.autocast(q.device.type, enabled=False):
        pad = n * blk - T

        def prepare(x: torch.Tensor) -> torch.Tensor:  # no copy when T is a multiple of W
            x = x.to(dtype)
            return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x

        glob = None
        if summaries is not None:
            cast = summaries._replace(k=summaries.k.to(dtype), v=summaries.v.to(dtype))
            glob = _summary_keys(cast, doc, window, n_global, n, blk, summary_width)
        out = _attend_blocks(prepare(q), prepare(k), prepare(v), doc, glob, window, blk, scale)
    return (out[:, :T] if pad else out).to(q.dtype)  # a slice's backward would zero-fill
