"""Hydra's part of the model config: which paths it builds and its cross-field checks."""

from __future__ import annotations

from pretrain.models.config import ModelConfig, component_problems


def hydra_components(cfg: ModelConfig) -> frozenset[str]:
    """The path kinds of a Hydra model: every section that is switched on.

    Attention and MoE count when enabled even if their ``every`` places them in no block, so
    their sections are still checked (and ``parallel.ep`` still sees the experts); the FFN is
    built only in blocks without MoE; a memory needs a block in its ``after_blocks``.
    """
    parts = set()
    if cfg.ssm.enabled:
        parts.add("ssm")
    if cfg.attention.enabled:
        parts.add("attention")
    if cfg.moe.enabled:
        parts.add("moe")
    if cfg.d_ff > 0 and not (cfg.moe.enabled and cfg.moe.every == 1):
        parts.add("ffn")
    for memory in ("workspace", "pkm"):
        section = getattr(cfg, memory)
        if section.enabled and section.after_blocks:
            parts.add(memory)
    return frozenset(parts)


def hydra_config_problems(cfg: ModelConfig) -> list[str]:
    """Every cross-field problem of a Hydra config, each naming its key."""
    problems = component_problems(cfg, hydra_components(cfg))
    for section in ("workspace", "pkm"):
        for idx in getattr(cfg, section).after_blocks:
            if not 0 <= idx < cfg.n_layers:
                problems.append(
                    f"model.{section}.after_blocks: block {idx} out of range 0..{cfg.n_layers - 1}"
                )
    if cfg.workspace.enabled and cfg.d_model % cfg.workspace.n_heads:
        problems.append(
            f"model.workspace.n_heads: {cfg.workspace.n_heads} does not divide"
            f" model.d_model={cfg.d_model}"
        )
    moe = cfg.moe
    if moe.enabled and moe.routing == "chunk" and moe.chunk_size > cfg.max_seq_len:
        problems.append("model.moe.chunk_size: larger than model.max_seq_len")
    if not (moe.enabled or cfg.d_ff > 0 or cfg.ssm.enabled or cfg.attention.enabled):
        problems.append(
            "model: a Hydra block needs at least one path (ssm, attention, moe or d_ff)"
        )
    return problems
