"""Incremental decoding for Attamba attention: the key/value scans' states, the leading window
and the boundary keys that have left it.

Shape legend: B batch, T new tokens, H query heads, Hkv key/value heads, K head dim, F frame keys
(the cached window plus the new tokens), S boundary keys kept.

Query t sees key s when ``t - s < leading`` (the window) or when s ends its chunk and
``s <= t - leading`` (``kernels.attention.boundary``). So the state after ``pos`` tokens is the
last ``leading - 1`` keys (the next query brings its own) and every chunk-ending key that has
left that window, in position order; a key that leaves the window is kept only if it ends its
chunk. The key/value scans restart at every chunk start, so their states are zeroed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention.boundary import chunk_starts
from pretrain.models.attamba.config import AttambaConfig
from pretrain.models.common.attention_decode import KVCache, masked_attention
from pretrain.models.common.ssm import SSMCache


@dataclass
class AttambaCache:
    """Attamba attention's decode state after ``pos`` tokens.

    Attributes:
        k_scan, v_scan: the key and value scans' states (zeros at a chunk start).
        window: the last ``min(leading - 1, pos)`` keys (rotated) and values.
        boundaries: the chunk-ending keys and values at positions ``<= pos - leading``.
    """

    k_scan: SSMCache
    v_scan: SSMCache
    window: KVCache
    boundaries: KVCache


def is_chunk_start(position: int, cfg: AttambaConfig, offset: int) -> bool:
    """Whether a chunk starts at ``position`` of a document (as ``chunk_starts``)."""
    return position == 0 or (position >= offset and (position - offset) % cfg.chunk_size == 0)


def attamba_cache_sizes(cfg: AttambaConfig, offset: int, context_len: int) -> tuple[int, int]:
    """(window keys, boundary keys) an ``AttambaCache`` holds after ``context_len`` tokens."""
    window = min(cfg.leading_tokens - 1, context_len)
    # s ends its chunk when s + 1 starts one; kept while s <= context_len - leading, so the
    # kept ends are the chunk starts q = s + 1 in 1 .. last
    last = context_len - cfg.leading_tokens + 1
    if offset == 0:
        return window, max(0, last) // cfg.chunk_size
    if last < offset:
        return window, 0
    return window, (last - offset) // cfg.chunk_size + 1


def restart_scans(cache: AttambaCache) -> None:
    """Zero both scans' states: the next token starts a chunk."""
    for scan in (cache.k_scan, cache.v_scan):
        scan.ssm = torch.zeros_like(scan.ssm)
        scan.conv = torch.zeros_like(scan.conv)


def boundary_decode(
    q: torch.Tensor,
    frame: KVCache,
    first: int,
    boundaries: KVCache,
    cfg: AttambaConfig,
    offset: int,
    pos: int,
) -> torch.Tensor:
    """New queries at pos .. pos + T - 1 over the kept ``boundaries`` (all visible to them) and
    the frame keys (positions from ``first``) in their window or ending a chunk before it."""
    T, device = q.shape[1], q.device
    t = pos + torch.arange(T, device=device)[:, None]  # [T, 1]
    p = first + torch.arange(frame.keys.shape[1], device=device)[None, :]  # [1, F]
    ends = chunk_starts(p + 1, cfg.chunk_size, offset)
    lead = cfg.leading_tokens
    visible = ((p <= t) & (t - p < lead)) | (ends & (p <= t - lead))
    kept = torch.ones(T, boundaries.keys.shape[1], dtype=torch.bool, device=device)
    keys = torch.cat([boundaries.keys.to(frame.keys.dtype), frame.keys], dim=1)
    values = torch.cat([boundaries.values.to(frame.values.dtype), frame.values], dim=1)
    return masked_attention(q, keys, values, torch.cat([kept, visible], dim=1))


def leave_window(
    frame: KVCache, first: int, cache: AttambaCache, cfg: AttambaConfig, offset: int, t_next: int
) -> None:
    """Keep the last ``leading - 1`` frame keys as the window; of the frame keys that leave it
    (positions <= t_next - leading), append those that end a chunk to the boundaries."""
    lead = cfg.leading_tokens
    leaving = max(0, t_next - lead - first + 1)
    if leaving:
        p = first + torch.arange(leaving)
        index = chunk_starts(p + 1, cfg.chunk_size, offset).nonzero()[:, 0]  # host positions
        index = index.to(frame.keys.device)
        cache.boundaries = cache.boundaries.extended(
            frame.keys.index_select(1, index), frame.values.index_select(1, index)
        )
    cache.window = frame.last(lead - 1)
