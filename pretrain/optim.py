"""AdamW with parameter groups, and the learning-rate schedule.

Groups are decided here by parameter name, not by attributes stuck on parameters:
- ``decay``: matrices (weights of linears, embeddings, experts, keys);
- ``no_decay``: vectors and scalars (norm weights, biases, gates) and the SSM's ``A_log``,
  ``D`` and ``dt_bias``;
- ``pkm_values``: PKM value tables (``values.weight``), with their own LR and no weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def param_group_name(name: str, param: nn.Parameter) -> str:
    """Which optimizer group the parameter called ``name`` belongs to."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("values.weight"):
        return "pkm_values"
    if param.ndim < 2 or leaf in NO_DECAY_NAMES:
        return "no_decay"
    return "decay"


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    pkm_value_lr: float | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters in the three groups above.

    Each group's ``lr_scale`` (relative to ``lr``) is kept so the schedule can scale all groups.
    """
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "pkm_values": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[param_group_name(name, param)].append(param)
    value_lr = lr if pkm_value_lr is None else pkm_value_lr
    settings = {
        "decay": {"weight_decay": weight_decay, "lr_scale": 1.0},
        "no_decay": {"weight_decay": 0.0, "lr_scale": 1.0},
        "pkm_values": {"weight_decay": 0.0, "lr_scale": value_lr / lr},
    }
    param_groups = [
        {"params": params, "name": name, "lr": lr * settings[name]["lr_scale"], **settings[name]}
        for name, params in groups.items()
        if params
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, foreach=True)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float, decay_fraction: float
) -> float:
    """WSD multiplier: linear warmup, constant, then a linear decay over the last steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(round(decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * progress


def lr_multiplier(step: int, train_cfg) -> float:
    """The configured schedule's multiplier at optimizer step ``step`` (0-based)."""
    if train_cfg.schedule == "wsd":
        return warmup_stable_decay(
            step,
            train_cfg.steps,
            train_cfg.warmup_steps,
            train_cfg.min_lr_ratio,
            train_cfg.wsd_decay_fraction,
        )
    return cosine_with_warmup(step, train_cfg.steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, multiplier: float) -> None:
    """Apply ``base_lr * multiplier`` to every group, times the group's own ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * multiplier * group.get("lr_scale", 1.0)
