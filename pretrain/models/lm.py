"""The causal language model shared by every family: embedding -> stack -> norm -> head.

Families differ in the blocks they build and in how the stack runs them (their
``ModelFamily.stack``, found through ``pretrain.models.registry``): n blocks once each, or one
shared block looped over depth. Blocks sit in an ``nn.ModuleDict`` keyed by the stack's names
so that parameter names stay stable for sharded checkpoints; each distinct block is there once.

Shape legend: B batch, T time, D d_model, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from pretrain.models.common.layers import RMSNorm
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import ModelConfig, validate_model_config
from pretrain.models.decode import DecodeCache
from pretrain.models.output import ModelOutput
from pretrain.models.paths import PATH_NAMES
from pretrain.models.registry import get_family


class CausalLM(nn.Module):
    """A decoder-only language model built from ``cfg.family``'s blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.stack = get_family(cfg.family).stack(cfg)
        self.blocks = nn.ModuleDict(self.stack.build_blocks())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        # Set from outside (parallel.apply): recompute each block in backward.
        self.activation_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter; used after ``to_empty()`` when built on meta."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        # Deeper stacks get smaller block weights so the residual stream does not grow with depth;
        # depth counts block *runs* (a block looped R times adds R times to the residual).
        block_std = std / math.sqrt(2 * sum(self.stack.runs_per_forward().values()))
        for block in self.blocks.values():
            block.init_weights(block_std)
        self.norm.init_weights(std)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=self.cfg.d_model**-0.5)

    def set_active_paths(self, active: Iterable[str]) -> None:
        """Switch block paths on (names in ``active``) or off (all others); off paths cost nothing."""
        active = set(active)
        unknown = active - set(PATH_NAMES)
        if unknown:
            raise ValueError(f"unknown path names {sorted(unknown)}; known: {list(PATH_NAMES)}")
        for block in self.blocks.values():
            for name in block.active:
                block.active[name] = name in active

    def set_step(self, step: int, recurrence: int | None = None) -> None:
        """Per-step stack settings (called by the curriculum): the stage's ``recurrence``."""
        self.stack.set_step(step, recurrence)

    def _run_block(
        self, name: str, h: torch.Tensor, context: SequenceContext, **extra: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of block ``name`` (recomputed in backward under activation checkpointing)."""
        block = self.blocks[name]
        if self.activation_checkpointing and torch.is_grad_enabled():
            # a recompute stopped early could skip a collective that ends the block
            with set_checkpoint_early_stop(not context.split):
                return checkpoint(block, h, None, context, use_reentrant=False, **extra)
        return block(h, context=context, **extra)

    def forward(
        self,
        input_ids: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        context: SequenceContext | None = None,
        *,
        cache: DecodeCache | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] (and optional document index seq_idx [B, T]) -> logits [B, T, V].

        ``context`` replaces ``seq_idx``: under context parallelism ``input_ids`` is this rank's
        slice of the rows and the context says where it sits (``SequenceContext.of_slice``).
        ``cache`` (decoding, ``pretrain.models.decode``; eval mode): ``input_ids`` continue the
        rows at ``cache.position``; the cache is updated in place and advanced.
        """
        h = self.tok_embeddings(input_ids)
        run_block = self._run_block
        if cache is not None:
            if self.training or seq_idx is not None or context is not None:
                raise ValueError("decoding with a cache needs eval mode, no seq_idx, no context")
            context = cache.context(*input_ids.shape, h.device)
            run_block = cache.block_runner(self._run_block)
        context = resolve_context(h, seq_idx, context)
        h, aux_loss = self.stack.forward(run_block, h, context, self.training)
        if cache is not None:
            cache.position += input_ids.shape[1]
        if context.split:  # every collective of this forward is behind h now
            h = context.comm.tie(h)
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = torch.nn.functional.linear(h, weight)
        return ModelOutput(logits=logits, aux_loss=aux_loss)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> CausalLM:
    """Validate ``cfg`` and build its model.

    Args:
        cfg: the model section of a run config.
        device: where to allocate; ``"meta"`` builds without memory (call ``to_empty`` and
            ``init_weights`` afterwards, e.g. after FSDP sharding).

    Returns:
        The model, initialised (unless built on meta).
    """
    validate_model_config(cfg)  # before any allocation
    with torch.device(device if device is not None else "cpu"):
        return CausalLM(cfg)
