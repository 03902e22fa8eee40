"""Gradient clipping over parameters that live on different meshes.

With expert parallelism the dense parameters are DTensors on the FSDP mesh and the experts on
the (expert-sharding x EP) mesh; DTensor refuses to stack norms across meshes, so each mesh's
norm is reduced on its own and the totals are combined (all global norms, hence equal on every
rank).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most ``max_norm`` (<= 0: no clipping).

    With all gradients on one mesh (or none) this is ``torch.nn.utils.clip_grad_norm_``, bit for
    bit; across meshes, the same formula with the combined norm.

    Returns:
        The global norm before clipping (non-finite when a gradient is).
    """
    params = [p for p in params if p.grad is not None]
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
        by_mesh.setdefault(mesh, []).append(p.grad)
    limit = max_norm if max_norm > 0 else float("inf")
    if len(by_mesh) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    norms = [_global_norm(grads) for grads in by_mesh.values()]
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    coef = min(limit / (total + 1e-6), 1.0)
    if coef < 1.0:
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef)
    return total
