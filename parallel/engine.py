"""The step engines of the torch backends: optimizer stepping and gradient-sync control.

``TorchEngine`` serves one process (``none``); ``DDPEngine`` and ``FSDPEngine`` add their
gradient-sync switch; ``parallel.deepspeed`` provides the DeepSpeed one. The loop calls:
``accumulate(is_last)`` around each micro-batch's forward and backward, ``clip_grad_norm``,
``step`` (or ``skip_step``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from parallel.dist import DistInfo
from parallel.grad_norm import clip_grad_norm
from parallel.pkm import ShardedBagLookup, sharded_lookups


class TorchEngine:
    """Plain PyTorch optimizer stepping (one process, or FSDP2 and DDP through subclasses).

    Args:
        model: the unwrapped model (FSDP2 shards it in place).
        module: what forward is called on (the DDP wrapper for ddp, else ``model``).
        optimizer: its optimizer.
        info: this process.
    """

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.info = info

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        """Around one micro-batch; gradients synchronise on the last one (nothing to do here)."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        return clip_grad_norm(self.model.parameters(), max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


class DDPEngine(TorchEngine):
    """DDP: no all-reduce on micro-batches before the last one of a step."""

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        if is_last or not self.info.distributed:
            yield
            return
        with self.module.no_sync():
            yield


class FSDPEngine(TorchEngine):
    """FSDP2: reduce-scatter gradients only on the last micro-batch of a step (and sum the split
    PKM tables' gradients over their replicas only then)."""

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(is_last)
        for lookup in self._pkm_lookups:
            lookup.sync_replicas = is_last
        yield

    @functools.cached_property
    def _pkm_lookups(self) -> list[ShardedBagLookup]:
        return sharded_lookups(self.model)
