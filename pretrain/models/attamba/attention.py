"""Attamba attention: keys and values from SSM scans that restart at every chunk; each query
attends to the chunks' last tokens and to its leading window.

Shape legend: B batch, T time, D d_model, H query heads, Hkv key/value heads, K head dim.

Keys and values are the outputs of two Mamba-2 mixers (``model.ssm``) run with ``seq_idx`` at
chunk granularity (``kernels.attention.boundary.chunk_ids``): the scan and the conv restart at
every chunk and document start, so the key of a chunk's last token summarises exactly that
chunk, and nothing of an earlier chunk leaks into it. Keys are rotated (RoPE) at their
positions in the document, like the queries. The attention itself is
``kernels.attention.op.chunk_boundary_attention``: O(T * (leading + T / P)), never a T x T mask.
At inference a layer keeps only the boundary keys/values, the leading window and the two scan
states (``cache_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# _query_groups: the slot groups the blocked kernel scores, which the FLOP count follows
from kernels.attention.boundary import _query_groups, boundary_slot_bound, chunk_ids
from kernels.attention.op import chunk_boundary_attention
from pretrain.models.attamba.config import AttambaConfig
from pretrain.models.attamba.decode import (
    AttambaCache,
    attamba_cache_sizes,
    boundary_decode,
    is_chunk_start,
    leave_window,
    restart_scans,
)
from pretrain.models.common.attention_decode import empty_kv
from pretrain.models.common.layers import apply_rope, rope_angles
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.common.ssm import Mamba2Mixer
from pretrain.models.config import AttentionConfig, SSMConfig


class AttambaAttention(nn.Module):
    """Chunk-boundary attention over SSM keys and values (one Attamba layer's mixer).

    Args:
        d_model: residual width.
        attention: heads (``n_heads``, ``n_kv_heads``) and ``rope_theta``.
        ssm: the key and value scans' settings.
        cfg: chunk size, leading window, chunking mode.
        offset: this layer's chunk grid offset (``AttambaConfig.offset``).
        norm_eps: the scans' gated-norm epsilon.
    """

    kernel_op = "boundary_attention"  # which kernel backend setting applies (kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends

    def __init__(
        self,
        d_model: int,
        attention: AttentionConfig,
        ssm: SSMConfig,
        cfg: AttambaConfig,
        offset: int,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if d_model % attention.n_heads:
            raise ValueError(f"n_heads={attention.n_heads} must divide d_model={d_model}")
        self.cfg, self.rope_theta, self.offset = cfg, attention.rope_theta, offset
        self.n_heads = attention.n_heads
        self.n_kv_heads = attention.n_kv_heads or attention.n_heads
        self.head_dim = d_model // attention.n_heads
        kv_dim = self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(d_model, self.n_heads * self.head_dim, bias=False)
        self.k_scan = Mamba2Mixer(d_model, ssm, norm_eps=norm_eps, d_out=kv_dim)
        self.v_scan = Mamba2Mixer(d_model, ssm, norm_eps=norm_eps, d_out=kv_dim)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        for lin in (self.wq, self.wo):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        self.k_scan.init_weights(init_std)
        self.v_scan.init_weights(init_std)

    def keys_values(
        self,
        x: torch.Tensor,
        context: SequenceContext,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: AttambaCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> k (rotated), v [B, T, Hkv, K] from scans restarted at every chunk.

        ``angles``: the RoPE (cos, sin) of ``context.doc_pos``, when the caller has them.
        ``cache`` (decoding): the scans continue from its states and update them.
        """
        B, T, _ = x.shape
        chunks = chunk_ids(context.doc_pos, self.cfg.chunk_size, self.offset)
        k_cache = v_cache = None
        if cache is not None:
            if is_chunk_start(context.offset, self.cfg, self.offset):
                restart_scans(cache)  # the states continue the first chunk of x
            k_cache, v_cache = cache.k_scan, cache.v_scan
        k = self.k_scan(x, seq_idx=chunks, cache=k_cache).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_scan(x, seq_idx=chunks, cache=v_cache).view(B, T, self.n_kv_heads, self.head_dim)
        if angles is None:
            angles = rope_angles(context.doc_pos, self.head_dim, self.rope_theta)
        return apply_rope(k, *angles), v

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        cache: AttambaCache | None = None,
    ) -> torch.Tensor:
        """Attention over x [B, T, D] (documents of ``seq_idx`` [B, T] kept apart) -> [B, T, D].

        ``cache`` (decoding, ``pretrain.models.decode``): x continues the one document whose
        state the cache keeps, at ``context.offset``; the cache is updated in place.
        """
        B, T, _ = x.shape
        context = resolve_context(x, seq_idx, context)
        if context.split:
            raise ValueError("Attamba attention does not support context parallelism (cp > 1)")
        angles = rope_angles(context.doc_pos, self.head_dim, self.rope_theta)
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), *angles)
        k, v = self.keys_values(x, context, angles, cache)
        pos = context.offset
        if cache is None or pos == 0:  # training, or a prompt: the op, its cost a forward's
            out = chunk_boundary_attention(
                q,
                k,
                v,
                context.doc_pos,
                context.seq_idx,
                chunk=self.cfg.chunk_size,
                offset=self.offset,
                leading=self.cfg.leading_tokens,
                backend=self.kernel_backend,
            )
        if cache is not None:
            frame = cache.window.extended(k, v)
            first = pos - cache.window.keys.shape[1]
            if pos > 0:
                out = boundary_decode(q, frame, first, cache.boundaries, self.cfg, self.offset, pos)
            leave_window(frame, first, cache, self.cfg, self.offset, pos + T)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttambaCache:
        """An ``AttambaCache`` of ``batch`` sequences, sized as after ``context_len`` tokens
        (zeros: only ``context_len = 0`` starts a decode)."""
        window, boundaries = attamba_cache_sizes(self.cfg, self.offset, context_len)
        device = device if device is not None else self.wq.weight.device
        dtype = dtype if dtype is not None else self.wq.weight.dtype
        heads = (self.n_kv_heads, self.head_dim, device, dtype)
        return AttambaCache(
            k_scan=self.k_scan.decode_state(batch, device=device, dtype=dtype),
            v_scan=self.v_scan.decode_state(batch, device=device, dtype=dtype),
            window=empty_kv(batch, window, *heads),
            boundaries=empty_kv(batch, boundaries, *heads),
        )

    def visible_keys(self, seq_len: int) -> float:
        """Mean number of keys a query sees in a one-document row of ``seq_len`` tokens."""
        lead, P = self.cfg.leading_tokens, self.cfg.chunk_size
        t = torch.arange(seq_len, dtype=torch.float64)
        window = torch.clamp(t + 1, max=lead)
        # boundaries at or before t - leading: chunk ends offset-1, offset-1+P, ... (offset 0: P-1)
        first_end = (self.offset or P) - 1
        seen = t - lead - first_end
        boundaries = torch.where(seen >= 0, torch.floor(seen / P) + 1, torch.zeros_like(t))
        return float((window + boundaries).mean())

    def executed_keys(self, seq_len: int) -> float:
        """Keys the attention kernel scores per query, mean over a row of ``seq_len`` tokens.

        ``torch`` (blocked, ``kernels.attention.boundary``): each block of W = min(leading, T)
        queries scores its own and the previous key block (2W keys, padded queries included),
        and each query group scores the boundary slots its last query may need. The groups are
        laid out for a batch of one (a large batch * heads * slots splits them finer and
        scores a few slots less). ``flex`` skips masked tiles: counted at the visible keys.
        """
        if self.kernel_backend != "torch":
            return self.visible_keys(seq_len)
        cfg = self.cfg
        blk = min(cfg.leading_tokens, seq_len)
        window = math.ceil(seq_len / blk) * blk * 2 * blk
        n_slots = boundary_slot_bound(seq_len, cfg.chunk_size, self.offset, cfg.leading_tokens)
        groups = _query_groups(
            1, seq_len, self.n_heads, n_slots, cfg.chunk_size, self.offset, cfg.leading_tokens
        )
        slots = sum((t1 - t0) * hi for t0, t1, hi in groups)
        return (window + slots) / seq_len

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token: ``q`` and ``out`` projections, the key and value scans'
        parts (``kv_proj``, ``kv_conv``, ``kv_scan``) and ``scores``, q.k and p.v over the
        ``executed_keys``."""
        return {
            "q": 2.0 * self.wq.weight.numel(),
            **self._scan_parts(lambda scan: scan.flops_breakdown(seq_len)),
            "scores": 2 * 2 * self.n_heads * self.head_dim * self.executed_keys(seq_len),
            "out": 2.0 * self.wo.weight.numel(),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

    def backward_flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Backward FLOPs per token: two products per projection, the scans' own backward, and
        2.5x the ``scores`` (both parts are flash-style: q.k recomputed, then dv, dp, dq, dk)."""
        fwd = self.flops_breakdown(seq_len)
        return {
            "q": 2 * fwd["q"],
            **self._scan_parts(lambda scan: scan.backward_flops_breakdown(seq_len)),
            "scores": 2.5 * fwd["scores"],
            "out": 2 * fwd["out"],
        }

    def _scan_parts(self, per_scan: Callable[[Mamba2Mixer], dict[str, float]]) -> dict[str, float]:
        """``kv_<part>``: a per-part count of the key scan plus that of the value scan."""
        k, v = per_scan(self.k_scan), per_scan(self.v_scan)
        return {f"kv_{part}": k[part] + v[part] for part in k}

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes kept per sequence for decoding after ``context_len`` tokens (``AttambaCache``):
        the keys/values of the leading window before the next query (``leading - 1``), those
        of the chunk boundaries that have left it (one per P tokens), plus both scans' states."""
        kv_per_token = 2 * self.n_kv_heads * self.head_dim * bytes_per_elem
        tokens = sum(attamba_cache_sizes(self.cfg, self.offset, context_len))
        scans = self.k_scan.cache_bytes(context_len, bytes_per_elem)
        scans += self.v_scan.cache_bytes(context_len, bytes_per_elem)
        return tokens * kv_per_token + scans
