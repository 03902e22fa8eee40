"""Pure Mamba-2 block: pre-norm SSD mixer (plus a SwiGLU FFN only if ``d_ff > 0``)."""

from __future__ import annotations

from torch import nn

from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.layers import SwiGLU
from pretrain.models.common.ssm import Mamba2Mixer
from pretrain.models.config import ModelConfig


def build_mamba2_block(cfg: ModelConfig, layer: int) -> GatedPathBlock:
    """Block ``layer`` of the Mamba-2 baseline (no gates: plain residual sums)."""
    paths: dict[str, nn.Module] = {"ssm": Mamba2Mixer(cfg.d_model, cfg.ssm, norm_eps=cfg.norm_eps)}
    if cfg.d_ff > 0:
        paths["ffn"] = SwiGLU(cfg.d_model, cfg.d_ff)
    return GatedPathBlock(cfg.d_model, paths, parallel=(), norm_eps=cfg.norm_eps, gated=False)
