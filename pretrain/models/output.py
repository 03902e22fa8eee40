"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    """``logits`` [B, T, V]; ``aux_loss`` a scalar (MoE balance + z losses; 0 without MoE)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
