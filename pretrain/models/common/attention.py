"""Attention mixers: Hydra's sparse global attention and the Transformer baseline's full attention.

Shape legend: B batch, T time, D d_model, H query heads, Hkv key/value heads, K head dim
(D / H), S summary tokens per row.

Both modules share projections, GQA and RoPE (``_AttentionBase``); they differ only in which keys
a query sees. RoPE positions count from each document's start, so a packed document is encoded
exactly as it would be alone. Decoding (a ``cache`` given to ``forward``) keeps what the next
query can see (``attention_decode``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import ChunkSummaries
from kernels.attention.causal import QUERY_BLOCK, document_causal_attention, resolve_backend
from kernels.attention.op import sparse_global_attention
from kernels.attention.ref import pool_chunk_sums, summary_block_width, visible_chunk_summaries
from pretrain.models.common.attention_decode import (
    KVCache,
    WindowCache,
    causal_decode,
    empty_kv,
    leave_window,
    window_cache_sizes,
    window_decode,
)
from pretrain.models.common.layers import apply_rope, rope_angles
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import AttentionConfig

# FlexAttention's default tile (BlockMask block size): the unit its block-sparse mask skips in.
FLEX_TILE = 128


class _AttentionBase(nn.Module):
    """q/k/v/o projections (no bias), grouped-query heads and RoPE; subclasses pick the keys."""

    def __init__(self, d_model: int, cfg: AttentionConfig) -> None:
        super().__init__()
        if d_model % cfg.n_heads:
            raise ValueError(f"n_heads={cfg.n_heads} must divide d_model={d_model}")
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = d_model // cfg.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        self.wq = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        """Truncated-normal projections; the model rescales ``wo`` per depth if it wants to."""
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)

    def _project(
        self, x: torch.Tensor, context: SequenceContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, K], k/v [B, T, Hkv, K] (q, k rotated at global positions)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        cos, sin = rope_angles(context.doc_pos, self.head_dim, self.cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: SequenceContext
    ) -> torch.Tensor:
        """q [B, T, H, K], k/v [B, T, Hkv, K] -> [B, T, H, K]."""
        raise NotImplementedError

    def _attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        context: SequenceContext,
        cache: KVCache | WindowCache,
    ) -> torch.Tensor:
        """Decoding: the new tokens' attention over what ``cache`` keeps; updates ``cache``."""
        raise NotImplementedError

    def _empty_kv(
        self, batch: int, length: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> KVCache:
        weight = self.wk.weight
        return empty_kv(
            batch,
            length,
            self.n_kv_heads,
            self.head_dim,
            device if device is not None else weight.device,
            dtype if dtype is not None else weight.dtype,
        )

    def executed_keys(self, seq_len: int) -> float:
        """Keys the attention kernel scores per query (mean over a row of ``seq_len`` tokens)."""
        raise NotImplementedError

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token: ``qkv`` and ``out`` projections (two per weight) and
        ``scores``, q.k and p.v over the ``executed_keys`` of each query."""
        return {
            "qkv": 2.0 * sum(lin.weight.numel() for lin in (self.wq, self.wk, self.wv)),
            "scores": 2 * 2 * self.n_heads * self.head_dim * self.executed_keys(seq_len),
            "out": 2.0 * self.wo.weight.numel(),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

    def backward_flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Backward FLOPs per token: two products per projection, and 2.5x the ``scores``:
        every attention kernel here is flash-style, its backward recomputes q.k and then forms
        dv, dp, dq and dk (five products of the forward's two)."""
        fwd = self.flops_breakdown(seq_len)
        return {"qkv": 2 * fwd["qkv"], "scores": 2.5 * fwd["scores"], "out": 2 * fwd["out"]}

    def _kv_bytes(self, positions: int, bytes_per_elem: int) -> int:
        """Bytes of the keys and values of ``positions`` positions (all key/value heads)."""
        return 2 * self.n_kv_heads * self.head_dim * positions * bytes_per_elem

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        cache: KVCache | WindowCache | None = None,
    ) -> torch.Tensor:
        """Attention over x [B, T, D] (documents of ``seq_idx`` [B, T] kept apart) -> [B, T, D].

        ``context`` (which replaces ``seq_idx``) places a context-parallel slice in its rows.
        ``cache`` (decoding, ``pretrain.models.decode``): x continues the one document whose
        keys the cache keeps, at ``context.offset``; the cache is updated in place.
        """
        B, T, _ = x.shape
        context = resolve_context(x, seq_idx, context)
        q, k, v = self._project(x, context)
        if cache is not None:
            out = self._attend_cached(q, k, v, context, cache)
        else:
            out = self._attend(q, k, v, context)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))


class SparseGlobalAttention(_AttentionBase):
    """Local causal window of ``cfg.window`` tokens plus up to ``cfg.n_global`` chunk summaries.

    A summary token is the mean of the RoPE-rotated keys (and of the values) of one completed,
    document-aligned chunk of ``cfg.summary_chunk`` tokens. Pooling keys *after* RoPE makes the
    summary logit the mean of the chunk's token logits, ``q_t . mean_s R(s) k_s =
    mean_s q_t . R(s) k_s``, so each token keeps its exact relative position to the query; the
    rotation's high frequencies average out within a chunk and the low ones (coarse distance)
    survive. Giving the pooled key one position instead would throw away where in the chunk each
    key sat; giving it none would make the score depend on the query's absolute position only.
    Which summaries a query sees is the rule of ``kernels.attention.ref``: chunks that end
    before its window starts, in its own document, the ``n_global`` most recent.
    """

    kernel_op = "attention"  # which kernel backend setting applies (see kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends

    def executed_keys(self, seq_len: int) -> float:
        """Keys scored per query: the window part plus the summary part (``_executed_keys``)."""
        return sum(self._executed_keys(seq_len))

    def _executed_keys(self, seq_len: int) -> tuple[float, float]:
        """(window keys, summary keys) scored per query on this backend, mean over a row.

        ``torch`` (blocked, ``kernels.attention.ref``): each block of W = min(window, T) queries
        scores its own and the previous key block (2W keys; padded queries of the last block
        included) and the ``summary_block_width`` summaries gathered for the block. ``flex``
        skips masked 128 x 128 tiles: counted at the visible keys (tile rounding left out);
        ``flash_attn`` likewise for the window, its summary part is the blocked one.
        """
        cfg = self.cfg
        blk = min(cfg.window, seq_len)
        padded = math.ceil(seq_len / blk) * blk / seq_len
        n_summaries = 0  # as ``_attend``: shorter rows build no summaries
        if cfg.n_global > 0 and seq_len > cfg.window:
            n_summaries = (seq_len - 1) // cfg.summary_chunk
        width = min(summary_block_width(cfg.n_global, blk, cfg.summary_chunk), n_summaries)
        window, summaries = _sga_visible_keys(cfg, seq_len)
        if self.kernel_backend == "torch":
            return padded * 2 * blk, padded * width
        if self.kernel_backend == "flash_attn":
            return window, padded * width
        return window, summaries

    def backward_flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """As for every attention here; ``flash_attn`` adds one more flash forward and backward
        of the window part to restore its log-sum-exp gradient (``kernels/attention/flash.py``)."""
        out = super().backward_flops_breakdown(seq_len)
        if self.kernel_backend == "flash_attn":
            window = self._executed_keys(seq_len)[0]
            out["scores"] += (2 + 5) * 2 * self.n_heads * self.head_dim * window
        return out

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes kept per sequence to decode token ``context_len + 1`` incrementally.

        The decode state (``WindowCache``): the keys/values of the last
        ``min(window - 1, context_len)`` tokens (the next query brings its own); the key/value
        summaries of the ``n_global`` most recent chunks that have left the next query's window
        (``bytes_per_elem`` each); the running key/value sums of the chunk leaving the window,
        in fp32 (4 bytes). Independent of ``context_len`` once it exceeds ``window`` and
        ``n_global`` chunks.
        """
        window, summaries = window_cache_sizes(self.cfg, context_len)
        partial_sums = self._kv_bytes(1, 4)
        return self._kv_bytes(window + summaries, bytes_per_elem) + partial_sums

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> WindowCache:
        """A ``WindowCache`` of ``batch`` sequences, sized as after ``context_len`` tokens (its
        contents are zeros: only ``context_len = 0`` starts a decode)."""
        window, summaries = window_cache_sizes(self.cfg, context_len)
        sums = self._empty_kv(batch, 1, device, torch.float32)
        return WindowCache(
            window=self._empty_kv(batch, window, device, dtype),
            summaries=self._empty_kv(batch, summaries, device, dtype),
            partial=torch.stack([sums.keys[:, 0], sums.values[:, 0]]),
        )

    def _attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        context: SequenceContext,
        cache: WindowCache,
    ) -> torch.Tensor:
        cfg, pos, T = self.cfg, context.offset, q.shape[1]
        frame = cache.window.extended(k, v)
        first = pos - cache.window.keys.shape[1]
        summaries, ends, partial = leave_window(frame, first, cache, cfg, pos + T)
        if pos == 0:  # a prompt: the op itself, its cost linear in T
            out = self._attend(q, k, v, context)
        else:
            out = window_decode(q, frame, first, summaries, ends, cfg, pos)
        cache.window = frame.last(cfg.window - 1)
        cache.summaries = summaries.last(cfg.n_global)
        cache.partial = partial
        return out

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: SequenceContext
    ) -> torch.Tensor:
        if context.split:
            return self._attend_slice(q, k, v, context)
        cfg, T = self.cfg, q.shape[1]
        summaries = None
        if cfg.n_global > 0 and T > cfg.window:  # shorter rows can never see a summary
            # (T - 1) // summary_chunk slots whatever the packing: one compiled kernel per T
            summaries = visible_chunk_summaries(k, v, cfg.summary_chunk, context.doc_pos)
        return sparse_global_attention(
            q,
            k,
            v,
            summaries,
            window=cfg.window,
            n_global=cfg.n_global,
            seq_idx=context.seq_idx,
            backend=self.kernel_backend,
            summary_width=summary_block_width(cfg.n_global, min(cfg.window, T), cfg.summary_chunk),
        )

    def _attend_slice(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: SequenceContext
    ) -> torch.Tensor:
        """The op on a frame of the ``window - 1`` positions before the slice plus the slice.

        The frame's leading positions carry the previous ranks' keys and values and zero queries
        whose outputs are dropped; positions before the row's start are a padding document.
        Summaries come in the frame's coordinates (those of earlier slices at negative ones).
        """
        cfg, (B, T) = self.cfg, q.shape[:2]
        halo = cfg.window - 1
        frame_k, frame_v = k, v
        if halo > 0:
            kv = torch.stack([k, v])  # [2, B, T, Hkv, K]
            # hop j brings the last min(T, halo - (j - 1) T) positions of rank r - j
            hops = math.ceil(halo / T)
            before = [
                context.comm.shift(kv[:, :, T - min(T, halo - (j - 1) * T) :], j, "attention_halo")
                for j in range(hops, 0, -1)
            ]
            frame_kv = torch.cat([*before, kv], dim=2)  # [2, B, halo + T, Hkv, K]
            frame_k, frame_v = frame_kv[0], frame_kv[1]
            q = torch.cat([q.new_zeros(B, halo, *q.shape[2:]), q], dim=1)
        frame_start = context.offset - halo
        frame_doc = _row_columns(context.row_doc, frame_start, halo + T, fill=-1)
        summaries = None
        if cfg.n_global > 0 and context.length > cfg.window:
            summaries = self._row_summaries(k, v, context, frame_start, frame_doc)
        out = sparse_global_attention(
            q,
            frame_k,
            frame_v,
            summaries,
            window=cfg.window,
            n_global=cfg.n_global,
            seq_idx=frame_doc,
            backend=self.kernel_backend,
        )
        return out[:, halo:]

    def _row_summaries(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        context: SequenceContext,
        frame_start: int,
        frame_doc: torch.Tensor,
    ) -> ChunkSummaries:
        """Summaries of the whole row from every rank's partial chunk sums, in frame coordinates."""
        seg, start, end = context.row_chunk_layout(self.cfg.summary_chunk)
        n_seg = start.shape[1]
        local_seg = context.row_slice(seg)
        sums = torch.stack([pool_chunk_sums(t, local_seg, n_seg) for t in (k, v)])
        sums = context.comm.all_reduce(sums, "attention_summaries")  # [2, B, S, Hkv, K]
        count = (end - start + 1).clamp_min(1)[:, :, None, None]
        means = (sums / count).to(k.dtype)
        length, frame_len = context.length, frame_doc.shape[1]
        is_pad = end >= length
        doc = context.row_doc.gather(1, end.clamp(max=length - 1))
        # the op numbers documents from the frame's first position (document_ids of frame_doc)
        doc = doc - frame_doc[:, :1]
        f_start = (start - frame_start).masked_fill(is_pad, frame_len + 1)
        f_end = (end - frame_start).clamp(max=frame_len).masked_fill(is_pad, frame_len)
        return ChunkSummaries(means[0], means[1], f_start, f_end, doc)


def sga_visible_keys(cfg: AttentionConfig, seq_len: int) -> float:
    """Mean number of keys a query sees in SGA: its local window plus completed-chunk summaries."""
    return sum(_sga_visible_keys(cfg, seq_len))


def _sga_visible_keys(cfg: AttentionConfig, seq_len: int) -> tuple[float, float]:
    """Mean (window keys, summaries) a query of a one-document row of ``seq_len`` tokens sees."""
    t = torch.arange(seq_len, dtype=torch.float64)
    local = torch.clamp(t + 1, max=cfg.window)
    summaries = torch.clamp(torch.floor((t + 1) / cfg.summary_chunk), max=cfg.n_global)
    return float(local.mean()), float(summaries.mean())


def _prefix_block_keys(seq_len: int, block: int) -> float:
    """Mean keys per query when queries run in blocks of ``block`` rows, each over the keys up
    to its block's end."""
    ends = torch.arange(block, seq_len + block, block, dtype=torch.float64).clamp(max=seq_len)
    rows = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
    return float((rows * ends).sum()) / seq_len


def _row_columns(row: torch.Tensor, start: int, width: int, fill: int) -> torch.Tensor:
    """Columns ``start .. start + width - 1`` of ``row`` [B, L], ``fill`` where start < 0."""
    if start >= 0:
        return row[:, start : start + width]
    pad = row.new_full((row.shape[0], -start), fill)
    return torch.cat([pad, row[:, : start + width]], dim=1)


class CausalSelfAttention(_AttentionBase):
    """Llama-style full causal attention (the Transformer baseline), documents kept apart.

    The op is ``kernels.attention.causal.document_causal_attention``. Without ``seq_idx`` it is
    ``scaled_dot_product_attention(is_causal=True)`` (flash kernels where available). With
    ``seq_idx`` (the trainer always passes it): FlexAttention with a document-causal mask on CUDA,
    elsewhere query blocks of 1024 rows, each over the keys up to its end under a
    [B, 1, 1024, end] mask, so no T x T mask is built beyond T = 1024. A context-parallel slice
    attends to the gathered keys of every earlier position under a [B, T_slice, end] mask
    (``_keys_up_to_slice``).
    """

    def executed_keys(self, seq_len: int) -> float:
        """Keys scored per query on the path training takes (``seq_idx`` given), mean over a row.

        Both paths run query blocks of W rows, each over the keys up to the block's end (masked
        elementwise): the ``torch`` path W = ``QUERY_BLOCK`` (so a row of T <= 1024 tokens
        scores the full T x T square), ``flex`` its 128 x 128 tiles (about half the square;
        tiles between two packed documents, which it also skips, are not modelled). The device
        of the weights decides the path, as ``document_causal_attention``'s ``auto`` does.
        """
        backend = resolve_backend("auto", self.wq.weight.device)
        block = FLEX_TILE if backend == "flex" else QUERY_BLOCK
        return _prefix_block_keys(seq_len, block)

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes of the KV cache of one sequence: every key and value of ``context_len`` tokens."""
        return self._kv_bytes(context_len, bytes_per_elem)

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A KV cache of ``batch`` sequences, sized as after ``context_len`` tokens (zeros)."""
        return self._empty_kv(batch, context_len, device, dtype)

    def _attend_cached(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        context: SequenceContext,
        cache: KVCache,
    ) -> torch.Tensor:
        pos = context.offset
        keys = cache.extended(k, v)
        out = self._attend(q, k, v, context) if pos == 0 else causal_decode(q, keys, pos)
        cache.keys, cache.values = keys.keys, keys.values
        return out

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: SequenceContext
    ) -> torch.Tensor:
        gqa = self.n_kv_heads != self.n_heads
        if context.split:
            k, v, mask = self._keys_up_to_slice(k, v, context)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
            return out.transpose(1, 2)
        return document_causal_attention(q, k, v, context.seq_idx)

    def _keys_up_to_slice(
        self, k: torch.Tensor, v: torch.Tensor, context: SequenceContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values of every position up to this slice's end (all-gathered over the CP ranks)
        [B, S, Hkv, K] and the [B, T, S] causal, same-document mask of this slice's queries."""
        B, T = k.shape[:2]
        gathered = context.comm.all_gather(torch.stack([k, v]), "attention_kv")
        n_keys = context.offset + T  # later slices are never visible
        kv = gathered[: context.comm.rank + 1].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
        q_pos = context.offset + torch.arange(T, device=k.device)
        k_pos = torch.arange(n_keys, device=k.device)
        doc_q = context.seq_idx  # this slice's columns of row_doc
        doc_k = context.row_doc[:, :n_keys]
        mask = (k_pos[None, :] <= q_pos[:, None]) & (doc_q[:, :, None] == doc_k[:, None, :])
        return kv[0], kv[1], mask
