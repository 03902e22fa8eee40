"""The Attamba family (Akhauri et al. 2024): Llama-style blocks whose attention reads SSM-made
keys and values at chunk boundaries plus a leading window (``attention.py``)."""

from __future__ import annotations

from pretrain.models.attamba.block import attamba_components, build_attamba_block
from pretrain.models.config import ModelConfig, component_problems
from pretrain.models.family import ModelFamily


def attamba_config_problems(cfg: ModelConfig) -> list[str]:
    """Heads that fit d_model; key/value scans whose heads fit; an FFN (or the MoE)."""
    # the key/value scans are Mamba-2 mixers: their head checks are the SSM's
    problems = component_problems(cfg, frozenset({"attention", "ssm"}))
    if cfg.d_ff == 0 and not cfg.attamba.use_moe:
        problems.append("model.d_ff: an Attamba block needs d_ff > 0 (or model.attamba.use_moe)")
    if cfg.attamba.use_moe and not cfg.moe.enabled:
        problems.append("model.attamba.use_moe: needs model.moe.enabled=true")
    if cfg.attamba.use_moe and cfg.moe.routing == "chunk" and cfg.moe.chunk_size > cfg.max_seq_len:
        problems.append("model.moe.chunk_size: larger than model.max_seq_len")
    return problems


FAMILY = ModelFamily(
    name="attamba",
    build_block=build_attamba_block,
    config_problems=attamba_config_problems,
    components=attamba_components,
    # a slice would need the boundary keys of every earlier slice and the leading halo
    supports_context_parallel=False,
)
