"""Llama-style Transformer block: pre-norm causal attention, then a pre-norm SwiGLU FFN."""

from __future__ import annotations

from pretrain.models.common.attention import CausalSelfAttention
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.layers import SwiGLU
from pretrain.models.config import ModelConfig


def build_transformer_block(cfg: ModelConfig, layer: int) -> GatedPathBlock:
    """Block ``layer`` of the Transformer baseline (no gates: plain residual sums)."""
    paths = {
        "attention": CausalSelfAttention(cfg.d_model, cfg.attention),
        "ffn": SwiGLU(cfg.d_model, cfg.d_ff),
    }
    return GatedPathBlock(cfg.d_model, paths, parallel=(), norm_eps=cfg.norm_eps, gated=False)
