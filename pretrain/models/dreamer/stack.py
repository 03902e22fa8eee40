"""Dreamer's stack: prelude blocks, the shared layer looped R times, coda blocks.

Block names (parameter names ``blocks.<name>``): ``prelude0``.., ``core``, ``coda0``... The
shared layer exists once, so its parameters (and their gradients, optimizer state and FSDP
shards) exist once; it runs R times per forward, which is what FLOP and cache accounting and
the init scaling count.

R in training is, in order of precedence: the curriculum stage's ``recurrence``; a value drawn
per optimizer step from ``dreamer.train_recurrence = [lo, hi]`` (uniform, seeded by the step
alone, so every rank and every resume draws the same); ``dreamer.recurrence``. At evaluation
(``model.eval()``) R is always ``dreamer.recurrence``.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from pretrain.models.common.sequence import SequenceContext
from pretrain.models.config import ModelConfig
from pretrain.models.dreamer.depth import first_depth_state, next_depth_state
from pretrain.models.dreamer.layer import build_dreamer_layer, build_outer_block
from pretrain.models.stack import RunBlock

CORE = "core"


def drawn_recurrence(step: int, lo: int, hi: int) -> int:
    """The training R of optimizer step ``step`` for ``train_recurrence = [lo, hi]``."""
    return random.Random(step).randint(lo, hi)


class RecurrentStack:
    """``n_prelude`` blocks, one shared layer run R times, ``n_coda`` blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        dc = cfg.dreamer
        self.prelude = [f"prelude{i}" for i in range(dc.n_prelude)]
        self.coda = [f"coda{i}" for i in range(dc.n_coda)]
        self.eval_recurrence = dc.recurrence
        self.train_recurrence = dc.recurrence

    def build_blocks(self) -> dict[str, nn.Module]:
        blocks: dict[str, nn.Module] = {name: build_outer_block(self.cfg) for name in self.prelude}
        blocks[CORE] = self._core = build_dreamer_layer(self.cfg)
        blocks.update({name: build_outer_block(self.cfg) for name in self.coda})
        return blocks

    def runs_per_forward(self, training: bool = False) -> dict[str, float]:
        runs = {name: 1.0 for name in (*self.prelude, *self.coda)}
        runs[CORE] = float(self.recurrence(training))
        return runs

    def looped_blocks(self) -> frozenset[str]:
        return frozenset({CORE})

    def recurrence(self, training: bool) -> int:
        """R of the next forward."""
        return self.train_recurrence if training else self.eval_recurrence

    def forward(
        self,
        run_block: RunBlock,
        h: torch.Tensor,
        context: SequenceContext,
        training: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        aux_loss = h.new_zeros((), dtype=torch.float32)
        for name in self.prelude:
            h, block_aux = run_block(name, h, context)
            aux_loss = aux_loss + block_aux
        self._core.begin_forward()
        depth = first_depth_state(h.device)
        for r in range(self.recurrence(training)):
            if r > 0:
                depth = next_depth_state(depth)
            h, block_aux, depth = run_block(CORE, h, context, depth=depth)
            aux_loss = aux_loss + block_aux
        for name in self.coda:
            h, block_aux = run_block(name, h, context)
            aux_loss = aux_loss + block_aux
        return h, aux_loss

    def set_step(self, step: int, recurrence: int | None) -> None:
        dc = self.cfg.dreamer
        if recurrence is not None:
            self.train_recurrence = recurrence
        elif dc.train_recurrence:
            self.train_recurrence = drawn_recurrence(step, *dc.train_recurrence)
        else:
            self.train_recurrence = dc.recurrence
