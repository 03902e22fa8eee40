"""Apply parallelism to a single-device model from outside, one step per function.

The family's ``parallelize_*`` (``pretrain/models/parallelize.py``) calls these in a fixed order:
expert parallelism (``parallel.expert``) -> (context parallelism needs nothing installed: each
batch is cut by ``pretrain.context_split``) -> activation checkpointing -> per-block torch.compile -> FSDP2 on each block (experts first, on their own
mesh), then the root; or DDP around the whole model. The model code knows nothing of it; with one
process the model is returned as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import Shard

from parallel.dist import DistInfo
from parallel.mesh import ParallelMesh


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (the model's forward loop honours the flag)."""
    model.activation_checkpointing = True


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block in place (parameter names stay stable for checkpoints)."""
    for block in model.blocks.values():
        block.compile()


def apply_fsdp2(
    model: nn.Module,
    mesh: ParallelMesh,
    expert_modules: Sequence[nn.Module],
    ignored_params: set[nn.Parameter],
    reshard_after_forward: bool,
    mixed_precision: bool,
    device_type: str,
    blocks: Sequence[nn.Module] | None = None,
    keep_root_gathered: bool = False,
) -> None:
    """FSDP2 ``fully_shard``: each EP rank's experts over the expert-sharding mesh, then every
    block and the root over the FSDP mesh (HSDP when ``dp_replicate > 1``), except the
    ``ignored_params``.

    Args:
        model: the model, with ``blocks`` (an ``nn.ModuleDict``).
        mesh: the run's mesh (must have more than one rank).
        expert_modules: the MoE layers' expert modules, already split by ``apply_expert_parallel``
            when ``ep > 1`` (with ``ep == 1`` they are sharded with their block like any weight).
        ignored_params: parameters sharded their own way (PKM value tables), left out of FSDP.
        reshard_after_forward: free gathered parameters after forward (ZeRO-3 style).
        mixed_precision: bf16 parameters and compute with fp32 gradient reduction (CUDA only).
        device_type: ``cpu`` or ``cuda``.
        blocks: the modules sharded as their own units (default: every block); parameters of
            any other module belong to the root's unit.
        keep_root_gathered: the root's unit is gathered once per forward and kept until its
            backward ends (``reshard_after_forward=False`` for the root only): a block looped
            over depth is left in it so that it is not gathered once per iteration.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward, "ignored_params": ignored_params}
    if mixed_precision and device_type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    dims = mesh.dims
    if dims.ep > 1:
        for experts in expert_modules:
            n_local, d_model, d_expert = experts.w1.shape[0] // dims.ep, *experts.w1.shape[1:]
            shards = dims.efsdp * dims.cp  # the expert-sharding mesh: efsdp (x cp)
            # fewer local experts than sharding ranks: shard each expert's matrices instead, when
            # they split evenly (FSDP2 pads uneven shards on dim 0 only)
            even = d_model % shards == 0 and d_expert % shards == 0
            dim = 1 if n_local < shards and even else 0
            fully_shard(
                experts,
                mesh=mesh.expert_fsdp,
                shard_placement_fn=lambda param, dim=dim: Shard(dim),
                **kwargs,
            )
    for block in model.blocks.values() if blocks is None else blocks:
        fully_shard(block, mesh=mesh.fsdp, **kwargs)
    if keep_root_gathered:
        kwargs["reshard_after_forward"] = False
    fully_shard(model, mesh=mesh.fsdp, **kwargs)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the whole model; unused parameters are expected (curriculum switches paths off).

    Buffers are not broadcast from rank 0 at each forward: the model's buffers are either the
    same on every rank by construction (the routing bias, updated from globally reduced
    counts) or this rank's own counts since the last optimizer step (expert load), which a
    broadcast would overwrite between micro-batches.
    """
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False
    )
