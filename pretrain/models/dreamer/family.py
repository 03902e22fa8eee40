"""The Dreamer family (Knupp et al. 2026, "Depth-Recurrent Attention Mixtures"): a prelude of
Transformer blocks, one shared layer looped R times over depth that mixes sequence attention,
depth attention (``depth.py``) and sparse expert attention (``experts.py``), a coda and the
head (``stack.py``)."""

from __future__ import annotations

from pretrain.models.config import ModelConfig, component_problems
from pretrain.models.dreamer.stack import RecurrentStack
from pretrain.models.family import ModelFamily


def dreamer_components(cfg: ModelConfig) -> frozenset[str]:
    """Sequence attention and expert attention ("moe") always; depth attention when on; the
    prelude and coda blocks' FFN when there are any."""
    dc = cfg.dreamer
    parts = {"attention", "moe"}
    if dc.depth_attention:
        parts.add("depth")
    if dc.n_prelude + dc.n_coda:
        parts.add("ffn")
    return frozenset(parts)


def dreamer_config_problems(cfg: ModelConfig) -> list[str]:
    """Attention heads that fit d_model (sequence and depth attention), expert attention's
    routing (per token, sigmoid scores), and an FFN for the prelude and coda blocks."""
    dc, moe = cfg.dreamer, cfg.moe
    problems = component_problems(cfg, frozenset({"attention"}))
    distinct = dc.n_prelude + 1 + dc.n_coda
    if cfg.n_layers != distinct:
        problems.append(
            f"model.n_layers: a Dreamer model has n_prelude + 1 + n_coda = {distinct} distinct"
            f" blocks (the shared layer counts once); set model.n_layers={distinct}"
        )
    if dc.depth_attention and cfg.d_model % dc.depth_heads:
        problems.append(
            f"model.dreamer.depth_heads: {dc.depth_heads} does not divide"
            f" model.d_model={cfg.d_model}"
        )
    if not moe.enabled:
        problems.append("model.moe.enabled: Dreamer's expert attention is its FFN; set it true")
    if moe.routing != "token":
        problems.append("model.moe.routing: Dreamer's expert attention routes tokens; set token")
    if moe.score_func != "sigmoid":
        problems.append(
            "model.moe.score_func: Dreamer's expert attention scores with sigmoid; set sigmoid"
        )
    defaults = type(moe)()
    for key in ("every", "chunk_size"):  # token routing in the one shared layer: no meaning
        if getattr(moe, key) != getattr(defaults, key):
            problems.append(f"model.moe.{key}: not used by Dreamer's expert attention; remove it")
    if dc.n_prelude + dc.n_coda and cfg.d_ff == 0:
        problems.append("model.d_ff: the prelude and coda blocks need d_ff > 0")
    return problems


FAMILY = ModelFamily(
    name="dreamer",
    build_stack=RecurrentStack,
    config_problems=dreamer_config_problems,
    components=dreamer_components,
    parallelize="pretrain.models.parallelize:parallelize_dreamer",
    # the causal sequence attention could take a slice; not built for the looped layer yet
    supports_context_parallel=False,
    # the shared layer's experts would be gathered once per iteration on the expert mesh
    supports_expert_parallel=False,
)
