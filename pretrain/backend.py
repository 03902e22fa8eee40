"""The parallel backend, resolved once from ``parallel.backend``: it applies parallelism, builds
the step engine and the checkpoint store. The trainer sees only the ``Protocol``s below.

- ``TorchBackend`` (``none``, ``ddp``, ``fsdp2``): the family's ``parallelize_*`` on the run's
  mesh, our AdamW, DCP checkpoints that reshard across world sizes and layouts;
- ``DeepSpeedBackend`` (``deepspeed``): the ZeRO engine with our AdamW groups, and the engine's
  own checkpoints in the same verified layout as DCP's (same world size only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from parallel.dist import DistInfo
from parallel.engine import DDPEngine, FSDPEngine, TorchEngine
from parallel.expert import apply_expert_parallel
from parallel.mesh import ParallelMesh
from parallel.pkm import apply_pkm_parallel
from pretrain.checkpoint import CheckpointManager, ModelOptimizerState
from pretrain.config import RunConfig
from pretrain.metrics import moe_layers, pkm_layers
from pretrain.models.family import resolve_parallelize
from pretrain.models.lm import CausalLM
from pretrain.models.registry import get_family
from pretrain.optim import build_optimizer


class StepEngine(Protocol):
    """What the loop steps through: forward module, backward, clip, optimizer step."""

    model: nn.Module  # the unwrapped model (sharded in place by FSDP2)
    module: nn.Module  # what forward is called on
    optimizer: torch.optim.Optimizer
    info: DistInfo

    def accumulate(self, is_last: bool) -> AbstractContextManager[None]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def step(self) -> None: ...

    def skip_step(self) -> None: ...

    @property
    def param_groups(self) -> list[dict]: ...


class CheckpointStore(Protocol):
    """Checkpoints of one run: ``save`` a step, ``load_latest`` valid one, ``wait`` for writes."""

    def save(self, step: int, extra: dict[str, Any]) -> None: ...

    def load_latest(self) -> dict[str, Any] | None: ...

    def wait(self) -> None: ...


class ParallelBackend(Protocol):
    """One data-parallel backend: builds the engine and the checkpoints of a run."""

    name: str

    def build_engine(
        self, model: CausalLM, cfg: RunConfig, mesh: ParallelMesh, info: DistInfo
    ) -> StepEngine: ...

    def build_checkpoints(
        self, engine: StepEngine, cfg: RunConfig, root: Path
    ) -> CheckpointStore: ...


def _optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    tc = cfg.train
    return build_optimizer(
        model, tc.lr, tc.weight_decay, tuple(tc.betas), pkm_value_lr=tc.pkm_value_lr
    )


class EngineCheckpoints:
    """DCP checkpoints of a torch engine's model and optimizer (plus per-rank extra state)."""

    def __init__(self, manager: CheckpointManager, engine: StepEngine) -> None:
        self.manager = manager
        self.engine = engine

    def _app_state(self) -> dict[str, Any]:
        return {"model": ModelOptimizerState(self.engine.model, self.engine.optimizer)}

    def save(self, step: int, extra: dict[str, Any]) -> None:
        self.manager.save(step, self._app_state(), extra)

    def load_latest(self) -> dict[str, Any] | None:
        return self.manager.load_latest(self._app_state())

    def wait(self) -> None:
        self.manager.wait()


class NoCheckpoints:
    """``checkpoint.enabled=false``: nothing is written, nothing is ever resumed."""

    def save(self, step: int, extra: dict[str, Any]) -> None:
        """Write nothing."""

    def load_latest(self) -> None:
        """There is never anything to resume (a rollback then stops with a clear error)."""

    def wait(self) -> None:
        """Nothing is pending."""


class TorchBackend:
    """``none`` (one process), ``ddp`` or ``fsdp2``, with DCP checkpoints."""

    ENGINES = {"none": TorchEngine, "ddp": DDPEngine, "fsdp2": FSDPEngine}

    def __init__(self, name: str) -> None:
        self.name = name

    def build_engine(
        self, model: CausalLM, cfg: RunConfig, mesh: ParallelMesh, info: DistInfo
    ) -> StepEngine:
        parallelize = resolve_parallelize(get_family(cfg.model.family))
        module = parallelize(model, mesh, info, cfg.parallel, cfg.train)
        engine = self.ENGINES[self.name] if info.distributed else TorchEngine
        return engine(model, module, _optimizer(model, cfg), info)

    def build_checkpoints(self, engine: StepEngine, cfg: RunConfig, root: Path) -> CheckpointStore:
        ck = cfg.checkpoint
        manager = CheckpointManager(
            root,
            keep_last=ck.keep_last,
            keep_every=ck.keep_every,
            async_save=ck.async_save,
            process_group=torch.distributed.group.WORLD if engine.info.distributed else None,
            timeout_s=engine.info.timeout_s,
        )
        return EngineCheckpoints(manager, engine)


class DeepSpeedBackend:
    """DeepSpeed ZeRO 1/2/3 (``parallel.deepspeed_config``) with its engine checkpoints."""

    name = "deepspeed"

    def build_engine(
        self, model: CausalLM, cfg: RunConfig, mesh: ParallelMesh, info: DistInfo
    ) -> StepEngine:
        from parallel.deepspeed import build_deepspeed_engine

        tc, pc = cfg.train, cfg.parallel
        # ep is 1 here (validated): this installs the MoE's global routing statistics only;
        # likewise the PKM key usage over every rank (the tables stay whole under DeepSpeed)
        apply_expert_parallel(list(moe_layers(model).values()), mesh)
        apply_pkm_parallel(pkm_layers(model), mesh, "none")
        model.activation_checkpointing = tc.activation_checkpointing
        return build_deepspeed_engine(
            model,
            _optimizer(model, cfg),
            pc.deepspeed_config,
            tc.batch_size,
            tc.grad_accum,
            tc.grad_clip,
            pc.mixed_precision,
            info,
        )

    def build_checkpoints(self, engine: StepEngine, cfg: RunConfig, root: Path) -> CheckpointStore:
        """The engine's checkpoints in the same verified layout as DCP's (docs/checkpoints.md)."""
        from parallel.deepspeed import DeepSpeedCheckpoints
        from pretrain.checkpoint.comm import CheckpointComm
        from pretrain.checkpoint.files import ENGINE_DEEPSPEED
        from pretrain.checkpoint.root import CheckpointRoot

        ck = cfg.checkpoint
        layout = CheckpointRoot(
            root,
            CheckpointComm(
                torch.distributed.group.WORLD if engine.info.distributed else None,
                timeout_s=engine.info.timeout_s,
            ),
            ENGINE_DEEPSPEED,
            keep_last=ck.keep_last,
            keep_every=ck.keep_every,
        )
        return DeepSpeedCheckpoints(engine, layout)


def resolve_backend(name: str) -> ParallelBackend:
    """The backend object of ``parallel.backend`` (already validated by the config)."""
    if name == "deepspeed":
        return DeepSpeedBackend()
    return TorchBackend(name)


def iter_after_step_hooks(model: nn.Module) -> Iterator[Any]:
    """The ``after_optimizer_step(stepped)`` methods of the components that have one."""
    for module in model.modules():
        hook = getattr(module, "after_optimizer_step", None)
        if callable(hook):
            yield hook
