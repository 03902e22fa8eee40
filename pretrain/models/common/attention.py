"""Attention mixers: Hydra's sparse global attention and the Transformer baseline's full attention.

Shape legend: B batch, T time, D d_model, H query heads, Hkv key/value heads, K head dim
(D / H), S summary tokens per row.

Both modules share projections, GQA and RoPE (``_AttentionBase``); they differ only in which keys
a query sees. RoPE positions count from each document's start, so a packed document is encoded
exactly as it would be alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import build_chunk_summaries, document_ids
from kernels.attention.op import sparse_global_attention
from pretrain.models.common.documents import positions_in_document
from pretrain.models.common.layers import apply_rope, rope_angles
from pretrain.models.config import AttentionConfig


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
        self, x: torch.Tensor, seq_idx: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, K], k/v [B, T, Hkv, K] (q, k rotated), doc positions [B, T]."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        doc_pos = positions_in_document(seq_idx, B, T, x.device)
        cos, sin = rope_angles(doc_pos, self.head_dim, self.cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, doc_pos

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_idx: torch.Tensor | None,
        doc_pos: torch.Tensor,
    ) -> torch.Tensor:
        """q [B, T, H, K], k/v [B, T, Hkv, K] -> [B, T, H, K]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over x [B, T, D] (documents of ``seq_idx`` [B, T] kept apart) -> [B, T, D]."""
        B, T, _ = x.shape
        q, k, v, doc_pos = self._project(x, seq_idx)
        out = self._attend(q, k, v, seq_idx, doc_pos)
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

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_idx: torch.Tensor | None,
        doc_pos: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.cfg
        summaries = None
        if cfg.n_global > 0 and q.shape[1] > cfg.window:  # shorter rows can never see a summary
            summaries = build_chunk_summaries(k, v, cfg.summary_chunk, doc_pos)
        return sparse_global_attention(
            q,
            k,
            v,
            summaries,
            window=cfg.window,
            n_global=cfg.n_global,
            seq_idx=seq_idx,
            backend=self.kernel_backend,
        )


class CausalSelfAttention(_AttentionBase):
    """Llama-style full causal attention (the Transformer baseline), documents kept apart.

    Without ``seq_idx`` it is ``scaled_dot_product_attention(is_causal=True)`` (flash kernels where
    available); with ``seq_idx`` a block-diagonal causal [B, 1, T, T] mask keeps documents apart,
    which costs O(T^2) memory for the mask.
    """

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_idx: torch.Tensor | None,
        doc_pos: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, K]
        gqa = self.n_kv_heads != self.n_heads
        if seq_idx is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            B, T = seq_idx.shape
            doc = document_ids(seq_idx, B, T, q.device)
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            mask = causal & (doc[:, :, None] == doc[:, None, :])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        return out.transpose(1, 2)
