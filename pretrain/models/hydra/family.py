"""Hydra: SSM, sparse global attention and FFN/MoE paths in parallel, then optional memories."""

from __future__ import annotations

from pretrain.models.family import ModelFamily
from pretrain.models.hydra.block import build_hydra_block
from pretrain.models.hydra.checks import hydra_components, hydra_config_problems

FAMILY = ModelFamily(
    name="hydra",
    build_block=build_hydra_block,
    config_problems=hydra_config_problems,
    components=hydra_components,
    parallelize="pretrain.models.parallelize:parallelize_hydra",
)
