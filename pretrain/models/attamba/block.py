"""The Attamba block: Llama-style pre-norm residual block whose attention is Attamba attention.

    h = x + Attamba(n(x));  h = h + FFN_or_MoE(n(h))   (path "ffn", or "moe" when attamba.use_moe)

Shape legend: B batch, T time, D d_model.
"""

from __future__ import annotations

from torch import nn

from pretrain.models.attamba.attention import AttambaAttention
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.layers import SwiGLU
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.config import ModelConfig


def attamba_block_paths(cfg: ModelConfig, layer: int) -> dict[str, nn.Module]:
    """The path modules of block ``layer``, keyed by path name, in the order they run."""
    offset = cfg.attamba.offset(layer, cfg.n_layers)
    paths: dict[str, nn.Module] = {
        "attention": AttambaAttention(
            cfg.d_model, cfg.attention, cfg.ssm, cfg.attamba, offset, norm_eps=cfg.norm_eps
        )
    }
    if cfg.attamba.use_moe and (layer + 1) % cfg.moe.every == 0:
        paths["moe"] = ChunkMoE(cfg.d_model, cfg.moe)
    else:
        paths["ffn"] = SwiGLU(cfg.d_model, cfg.d_ff)
    return paths


def build_attamba_block(cfg: ModelConfig, layer: int) -> GatedPathBlock:
    """Block ``layer`` of an Attamba model (no gates: plain residual sums, like Llama)."""
    paths = attamba_block_paths(cfg, layer)
    return GatedPathBlock(cfg.d_model, paths, parallel=(), norm_eps=cfg.norm_eps, gated=False)


def attamba_components(cfg: ModelConfig) -> frozenset[str]:
    """The path kinds an Attamba config builds."""
    if not cfg.attamba.use_moe:
        return frozenset({"attention", "ffn"})
    every = cfg.moe.every
    dense = any((layer + 1) % every for layer in range(cfg.n_layers))
    return frozenset({"attention", "moe", *(("ffn",) if dense else ())})
