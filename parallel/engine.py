"""The small interface the trainer steps through, one implementation per backend family.

``TorchEngine`` serves ``none``, ``ddp`` and ``fsdp2``; ``parallel.deepspeed`` provides the
DeepSpeed one. The loop calls: ``accumulate(is_last)`` around each micro-batch's forward and
backward, ``clip_grad_norm``, ``step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from parallel.dist import DistInfo


class TorchEngine:
    """Plain PyTorch optimizer stepping, with DDP / FSDP2 gradient-sync control."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
        backend: str,
    ) -> None:
        self.model = model  # the unwrapped model (FSDP2 shards it in place)
        self.module = module  # what forward is called on (the DDP wrapper for ddp)
        self.optimizer = optimizer
        self.info = info
        self.backend = backend

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        """Synchronise gradients across ranks only on the last micro-batch of a step."""
        if self.backend == "ddp" and self.info.distributed and not is_last:
            with self.module.no_sync():
                yield
            return
        if self.backend == "fsdp2":
            self.model.set_requires_gradient_sync(is_last)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups
