"""The Llama-style Transformer baseline: full causal attention and a SwiGLU FFN per block."""

from __future__ import annotations

from pretrain.models.config import ModelConfig, component_problems
from pretrain.models.family import ModelFamily
from pretrain.models.transformer.block import build_transformer_block

COMPONENTS = frozenset({"attention", "ffn"})


def transformer_components(cfg: ModelConfig) -> frozenset[str]:
    """Every block has causal attention and a dense FFN (the MoE section is not used)."""
    return COMPONENTS


def transformer_config_problems(cfg: ModelConfig) -> list[str]:
    """Attention heads that fit ``d_model``, and a dense FFN."""
    problems = component_problems(cfg, COMPONENTS)
    if cfg.d_ff == 0 and not cfg.moe.enabled:
        problems.append("model.d_ff: a Transformer needs d_ff > 0")
    return problems


FAMILY = ModelFamily(
    name="transformer",
    build_block=build_transformer_block,
    config_problems=transformer_config_problems,
    components=transformer_components,
)
