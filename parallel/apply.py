"""Apply parallelism to a single-device model from outside, in a fixed order.

Order (as torchtitan documents it): activation checkpointing -> per-block torch.compile ->
FSDP2 on each block, then the root (or DDP around the whole model). The model code knows nothing
of it; with one process (backend ``none``) the model is returned as it was.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parallel.dist import DistInfo

logger = logging.getLogger("parallel")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward (the model's forward loop honours the flag)."""
    model.activation_checkpointing = True


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` each block in place (parameter names stay stable for checkpoints)."""
    for block in model.blocks.values():
        block.compile()


def apply_fsdp2(
    model: nn.Module, info: DistInfo, reshard_after_forward: bool, mixed_precision: bool
) -> None:
    """Shard every block, then the root, with FSDP2 ``fully_shard`` over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp_shard",))
    kwargs = {"mesh": mesh}
    if mixed_precision and info.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in model.blocks.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the whole model; unused parameters are expected (curriculum switches paths off)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def parallelize_model(
    model: nn.Module,
    backend: str,
    info: DistInfo,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
    mixed_precision: bool = True,
) -> nn.Module:
    """Apply the configured parallelism; returns the module to call forward on.

    For ``none`` and ``fsdp2`` that is ``model`` itself (FSDP2 works in place); for ``ddp`` it is
    the DDP wrapper; ``deepspeed`` is applied by ``parallel.deepspeed`` with its optimizer.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_blocks:
        apply_compile(model)
    if backend == "fsdp2":
        apply_fsdp2(model, info, reshard_after_forward, mixed_precision)
        logger.info(
            "FSDP2 over %d ranks (reshard_after_forward=%s)", info.world_size, reshard_after_forward
        )
        return model
    if backend == "ddp" and info.distributed:
        return wrap_ddp(model, info)
    return model
