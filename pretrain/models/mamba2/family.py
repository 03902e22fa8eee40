"""The pure Mamba-2 baseline: one SSD mixer per block (plus a SwiGLU FFN when ``d_ff > 0``)."""

from __future__ import annotations

from pretrain.models.config import ModelConfig, component_problems
from pretrain.models.family import ModelFamily
from pretrain.models.mamba2.block import build_mamba2_block


def mamba2_components(cfg: ModelConfig) -> frozenset[str]:
    """An SSM in every block, a dense FFN only when ``d_ff > 0``."""
    return frozenset({"ssm", "ffn"} if cfg.d_ff > 0 else {"ssm"})


def mamba2_config_problems(cfg: ModelConfig) -> list[str]:
    """SSM heads that fit ``d_inner`` (the only cross-field constraint of the baseline)."""
    return component_problems(cfg, mamba2_components(cfg))


FAMILY = ModelFamily(
    name="mamba2",
    build_block=build_mamba2_block,
    config_problems=mamba2_config_problems,
    components=mamba2_components,
)
