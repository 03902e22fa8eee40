"""Incremental decoding for the attention mixers: what a layer keeps between calls, and the
attention of new queries over it.

Shape legend: B batch, T new tokens, H query heads, Hkv key/value heads, K head dim, S key
positions, F frame keys (the cached window plus the new tokens).

A decode call brings T >= 1 new tokens at positions pos .. pos + T - 1 of one document
(``SequenceContext.offset`` is pos). The first call (pos = 0) runs the layer's training op on its
tokens, so a long prompt costs what a forward costs; later calls attend densely over the cached
keys and the new ones, with the op's visibility rule written out as a [T, S] mask (T is small
there: one token per generated step).

Sparse global attention keeps what its next query can see (``kernels.attention.ref``): the keys
of the last ``window - 1`` tokens (the query brings its own), the ``n_global`` most recent
summaries of chunks that have left the window, and the fp32 sums of the chunk now leaving it.
A chunk's summary becomes visible exactly when its last key leaves the window (end <= t -
window), so keys move from the window into the running sums as they leave, and a chunk's mean is
taken when its last key arrives there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention.ref import pool_chunk_sums
from pretrain.models.config import AttentionConfig


@dataclass
class KVCache:
    """Keys (RoPE applied) and values of S positions, in position order: [B, S, Hkv, K] each."""

    keys: torch.Tensor
    values: torch.Tensor

    def extended(self, keys: torch.Tensor, values: torch.Tensor) -> KVCache:
        """These positions followed by new ones [B, T, Hkv, K] (in the new ones' dtype)."""
        return KVCache(
            torch.cat([self.keys.to(keys.dtype), keys], dim=1),
            torch.cat([self.values.to(values.dtype), values], dim=1),
        )

    def last(self, n: int) -> KVCache:
        """The last ``n`` positions (all of them when there are fewer)."""
        start = max(0, self.keys.shape[1] - n)
        return KVCache(self.keys[:, start:], self.values[:, start:])


def empty_kv(
    batch: int, length: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
) -> KVCache:
    """A zero ``KVCache`` of ``length`` positions."""
    shape = (batch, length, heads, head_dim)
    return KVCache(
        torch.zeros(shape, device=device, dtype=dtype),
        torch.zeros(shape, device=device, dtype=dtype),
    )


@dataclass
class WindowCache:
    """Sparse global attention's decode state after ``pos`` tokens.

    Attributes:
        window: the last ``min(window - 1, pos)`` keys/values.
        summaries: the ``n_global`` most recent chunk summaries whose chunk has left the window.
        partial: [2, B, Hkv, K] fp32 sums of the keys and values of the chunk leaving the window
            (its positions that have left so far).
    """

    window: KVCache
    summaries: KVCache
    partial: torch.Tensor


def window_cache_sizes(cfg: AttentionConfig, context_len: int) -> tuple[int, int]:
    """(window keys, summaries) a ``WindowCache`` holds after ``context_len`` tokens."""
    window = min(cfg.window - 1, context_len)
    # chunks whose last position has left the window of the next query (end <= pos - window)
    done = max(0, context_len - cfg.window + 1) // cfg.summary_chunk
    return window, min(cfg.n_global, done)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention of q [B, T, H, K] over k/v [B, S, Hkv, K] under ``mask`` [T, S] (True =
    visible; None: all) -> [B, T, H, K], in fp32 at least with autocast off, like the ops."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        qt, kt, vt = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]
        )
    return out.transpose(1, 2).to(q.dtype)


def causal_decode(q: torch.Tensor, keys: KVCache, pos: int) -> torch.Tensor:
    """New queries at pos .. pos + T - 1 over every key up to their own (``keys`` holds
    positions 0 .. pos + T - 1)."""
    T = q.shape[1]
    mask = None
    if T > 1:
        k_pos = torch.arange(pos + T, device=q.device)
        mask = k_pos[None, :] <= (pos + torch.arange(T, device=q.device))[:, None]
    return masked_attention(q, keys.keys, keys.values, mask)


def leave_window(
    frame: KVCache, first: int, cache: WindowCache, cfg: AttentionConfig, t_next: int
) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Move the frame's keys that leave the window of query ``t_next`` into chunk sums.

    Args:
        frame: the cached window followed by the call's new keys, positions ``first`` ..
            ``t_next - 1``.
        first: position of the frame's first key.
        cache: the state before the call (its summaries and partial sums).
        cfg: the layer's attention settings.
        t_next: the position after the call's last token.

    Returns:
        (every summary a query of this call or the next may need, cached ones first, in end
        order; the last position of each summary's chunk [G] int64; the new partial sums).
    """
    chunk, dtype = cfg.summary_chunk, frame.keys.dtype
    done_before = first // chunk  # chunks that ended before the frame (summaries or dropped)
    n_cached = cache.summaries.keys.shape[1]
    ends = chunk * torch.arange(done_before - n_cached + 1, done_before + 1) - 1
    leaving = max(0, t_next - cfg.window - first + 1)  # keys at positions <= t_next - window
    if leaving == 0:
        return cache.summaries, ends, cache.partial
    position = first + torch.arange(leaving)
    seg = (position // chunk - done_before).to(frame.keys.device)
    n_seg = (first + leaving - 1) // chunk - done_before + 1
    seg = seg[None].expand(frame.keys.shape[0], -1)
    sums = torch.stack(
        [pool_chunk_sums(t[:, :leaving], seg, n_seg) for t in (frame.keys, frame.values)]
    )  # [2, B, n_seg, Hkv, K]
    sums[:, :, 0] += cache.partial.to(sums.dtype)
    n_full = (first + leaving) // chunk - done_before
    means = (sums[:, :, :n_full] / chunk).to(dtype)
    partial = sums[:, :, n_full] if n_full < n_seg else torch.zeros_like(cache.partial)
    summaries = cache.summaries.extended(means[0], means[1])
    new_ends = chunk * torch.arange(done_before + 1, done_before + n_full + 1) - 1
    return summaries, torch.cat([ends, new_ends]), partial.to(cache.partial.dtype)


def window_decode(
    q: torch.Tensor,
    frame: KVCache,
    first: int,
    summaries: KVCache,
    ends: torch.Tensor,
    cfg: AttentionConfig,
    pos: int,
) -> torch.Tensor:
    """New queries at pos .. pos + T - 1 over their local window (frame keys, positions from
    ``first``) and the ``n_global`` most recent summaries that end before it (``ends`` [G])."""
    T, device = q.shape[1], q.device
    t = pos + torch.arange(T, device=device)[:, None]  # [T, 1]
    p = first + torch.arange(frame.keys.shape[1], device=device)[None, :]  # [1, F]
    local = (p <= t) & (p > t - cfg.window)
    candidate = ends.to(device)[None, :] <= t - cfg.window  # [T, G], a prefix of each row
    newest = candidate.sum(dim=1, keepdim=True)
    index = torch.arange(candidate.shape[1], device=device)[None, :]
    visible = candidate & (index >= newest - cfg.n_global)
    keys = torch.cat([summaries.keys.to(frame.keys.dtype), frame.keys], dim=1)
    values = torch.cat([summaries.values.to(frame.values.dtype), frame.values], dim=1)
    return masked_attention(q, keys, values, torch.cat([visible, local], dim=1))
