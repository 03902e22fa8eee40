"""``parallelize_<family>``: the parallelism of each model family, applied in a fixed order.

Order (each step sees the result of the previous one):
1. expert parallelism: each MoE layer's experts split over the EP ranks, its dispatcher and the
   routing-statistics reducer installed (``parallel.expert``);
2. context parallelism: nothing to install (``pretrain.context_split`` cuts each batch);
3. PKM: the value tables split by columns over ``parallel.pkm_shard`` (FSDP2 only), with their
   sharded lookup, and the key-usage reducer (``parallel.pkm``);
4. activation checkpointing;
5. per-block ``torch.compile``;
6. FSDP2: the experts of each MoE layer on the expert-sharding mesh, then every block, then the
   root, on the FSDP mesh, leaving the split PKM tables out; or DDP around the model.

Every family shares ``parallelize_layered``: it asks the stack which blocks are looped over
depth (Dreamer's shared layer) and keeps those in the root unit. A family that needs other
steps names its own function in its ``ModelFamily`` (``parallelize="module:function"``,
resolved by ``pretrain.models.family.resolve_parallelize``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from parallel.apply import apply_activation_checkpointing, apply_compile, apply_fsdp2, wrap_ddp
from parallel.dist import DistInfo
from parallel.expert import apply_expert_parallel
from parallel.mesh import ParallelMesh
from parallel.pkm import apply_pkm_parallel
from pretrain.metrics import pkm_layers
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.lm import CausalLM
from pretrain.train_config import ParallelConfig, TrainConfig

logger = logging.getLogger("parallel")


def parallelize_layered(
    model: CausalLM,
    mesh: ParallelMesh,
    info: DistInfo,
    parallel: ParallelConfig,
    train: TrainConfig,
) -> nn.Module:
    """Apply ``parallel.backend`` (none, ddp or fsdp2) and the mesh's dimensions to ``model``.

    A block the stack loops over depth (``looped_blocks``: Dreamer's shared layer) is not an
    FSDP2 unit of its own: it stays in the root's unit, which is all-gathered once per forward
    and kept gathered through the loop and the backward (the root alone does not reshard after
    forward), then reduce-scattered once; as its own unit it would be gathered at every
    iteration and again in backward. Activation checkpointing recomputes each block call (each
    iteration apart); ``torch.compile`` compiles each distinct block once (``DreamerLayer``
    compiles its fixed-shape paths, which serve every iteration).

    Returns:
        The module to call forward on: ``model`` itself (FSDP2 works in place), or its DDP
        wrapper.
    """
    moe_layers = [m for m in model.modules() if isinstance(m, ChunkMoE)]
    apply_expert_parallel(moe_layers, mesh)
    pkm_over = parallel.pkm_shard if parallel.backend == "fsdp2" else "none"
    sharded_tables = apply_pkm_parallel(pkm_layers(model), mesh, pkm_over)
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.compile:
        apply_compile(model)
    if parallel.backend == "fsdp2" and mesh.mesh is not None:
        looped = model.stack.looped_blocks()
        apply_fsdp2(
            model,
            mesh,
            [m.experts for m in moe_layers],
            ignored_params=sharded_tables,
            reshard_after_forward=parallel.reshard_after_forward,
            mixed_precision=parallel.mixed_precision,
            device_type=info.device.type,
            blocks=[block for name, block in model.blocks.items() if name not in looped],
            keep_root_gathered=bool(looped),
        )
        logger.info(
            "FSDP2 on %s (reshard_after_forward=%s); PKM tables split over %s; looped blocks"
            " %s in the root unit",
            mesh.dims.describe(),
            parallel.reshard_after_forward,
            pkm_over if sharded_tables else "none",
            sorted(looped) or "none",
        )
        return model
    if parallel.backend == "ddp" and info.distributed:
        return wrap_ddp(model, info)
    return model


Parallelize = Callable[[CausalLM, ParallelMesh, DistInfo, ParallelConfig, TrainConfig], nn.Module]
parallelize_hydra: Parallelize = parallelize_layered
parallelize_dreamer: Parallelize = parallelize_layered
"""Dreamer's stack loops its shared layer (``looped_blocks``), which ``parallelize_layered``
keeps in FSDP2's root unit; its EP and CP are refused by the config check."""
