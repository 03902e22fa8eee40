"""How ``CausalLM`` runs its blocks between the embedding and the head: the *stack*.

A stack names the model's distinct blocks (each built once, so each parameter exists once) and
says how often each runs per forward. ``LayeredStack`` runs n independent blocks in turn (Hydra,
Transformer, Mamba-2, Attamba); a family with another shape (Dreamer: one shared block looped
over depth) declares its own through ``ModelFamily.build_stack``. Everything that walks the
model (init scaling, FLOP, parameter and cache accounting, the curriculum, parallelism) asks the
stack instead of assuming ``n_layers`` blocks run once each.

Shape legend: B batch, T time, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from pretrain.models.common.sequence import SequenceContext

RunBlock = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``run_block(name, h, context, **extra) -> (h, aux_loss)``: one call of block ``name``
(``CausalLM`` supplies it; it adds activation checkpointing when that is on)."""


class BlockStack(Protocol):
    """The blocks of a model and the order they run in."""

    def build_blocks(self) -> dict[str, nn.Module]:
        """Every distinct block, keyed by a stable name (parameter names are ``blocks.<name>``)."""
        ...

    def runs_per_forward(self, training: bool = False) -> dict[str, float]:
        """How many times each block runs in one forward: at evaluation settings, or with the
        per-step settings of the next training step (``training``)."""
        ...

    def looped_blocks(self) -> frozenset[str]:
        """Blocks that may run more than once per forward (kept gathered by FSDP2)."""
        ...

    def forward(
        self, run_block: RunBlock, h: torch.Tensor, context: SequenceContext, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, D] after the embedding -> (h [B, T, D] before the final norm, aux_loss)."""
        ...

    def set_step(self, step: int, recurrence: int | None) -> None:
        """Per-step settings (the curriculum's ``recurrence``; a random depth drawn per step)."""
        ...


class LayeredStack:
    """``n_layers`` independent blocks named "0".."n-1", each run once, in order."""

    def __init__(self, n_layers: int, build_block: Callable[[int], nn.Module]) -> None:
        self.n_layers = n_layers
        self._build_block = build_block

    def build_blocks(self) -> dict[str, nn.Module]:
        return {str(i): self._build_block(i) for i in range(self.n_layers)}

    def runs_per_forward(self, training: bool = False) -> dict[str, float]:
        return {str(i): 1.0 for i in range(self.n_layers)}

    def looped_blocks(self) -> frozenset[str]:
        return frozenset()

    def forward(
        self, run_block: RunBlock, h: torch.Tensor, context: SequenceContext, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for i in range(self.n_layers):
            h, block_aux = run_block(str(i), h, context)
            aux_loss = aux_loss + block_aux
        return h, aux_loss

    def set_step(self, step: int, recurrence: int | None) -> None:
        if recurrence is not None:  # the run config check rejects this first
            raise ValueError("a layered stack has no recurrence to set")
