"""Build a ``Trainer`` from a run config: small ``build_*`` steps in the order they depend on.

distributed init -> stages -> model (+ kernel backends) -> parallelism -> optimizer/engine ->
checkpoints -> tracker factory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from kernels.backends import select_backends
from parallel.apply import parallelize_model
from parallel.dist import DistInfo, init_distributed, shutdown
from parallel.engine import TorchEngine
from pretrain.checkpoint import CheckpointManager, ModelOptimizerState
from pretrain.config import RunConfig, config_to_dict
from pretrain.curriculum import Stage, resolve_stages
from pretrain.models import build_model
from pretrain.models.kernel_backends import apply_kernel_backends
from pretrain.models.lm import CausalLM
from pretrain.optim import build_optimizer
from pretrain.trainer import Trainer

logger = logging.getLogger("pretrain")


class EngineCheckpoints:
    """DCP checkpoints of a torch engine's model and optimizer (plus per-rank extra state)."""

    def __init__(self, manager: CheckpointManager, engine: TorchEngine) -> None:
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


def build_stages(cfg: RunConfig, info: DistInfo) -> list[Stage]:
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum * info.dp_world
    return resolve_stages(cfg.curriculum, cfg.train.steps, cfg.train.seq_len, rows_per_step)


def build_training_model(cfg: RunConfig, info: DistInfo) -> CausalLM:
    """The model on its device, seeded identically on every rank, with its kernel backends."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device=info.device)
    requested = {op: getattr(cfg.kernels, op) for op in ("ssd", "pkm", "moe", "attention")}
    backends = select_backends(requested, info.device, deterministic=cfg.kernels.deterministic)
    apply_kernel_backends(model, backends)
    return model


def build_engine(cfg: RunConfig, model: CausalLM, info: DistInfo) -> Any:
    """Parallelise ``model`` and wrap it with its optimizer in the backend's engine."""
    tc, pc = cfg.train, cfg.parallel
    if pc.backend == "deepspeed":
        from parallel.deepspeed import build_deepspeed_engine

        model.activation_checkpointing = tc.activation_checkpointing
        optimizer = build_optimizer(
            model, tc.lr, tc.weight_decay, tuple(tc.betas), pkm_value_lr=tc.pkm_value_lr
        )
        return build_deepspeed_engine(
            model,
            optimizer,
            pc.deepspeed_config,
            tc.batch_size,
            tc.grad_accum,
            tc.grad_clip,
            pc.mixed_precision,
            info,
        )
    module = parallelize_model(
        model,
        pc.backend,
        info,
        activation_checkpointing=tc.activation_checkpointing,
        compile_blocks=tc.compile,
        reshard_after_forward=pc.reshard_after_forward,
        mixed_precision=pc.mixed_precision,
    )
    optimizer = build_optimizer(
        model, tc.lr, tc.weight_decay, tuple(tc.betas), pkm_value_lr=tc.pkm_value_lr
    )
    return TorchEngine(model, module, optimizer, info, pc.backend)


def build_checkpoints(cfg: RunConfig, engine: Any, run_dir: Path) -> Any:
    ck = cfg.checkpoint
    if not ck.enabled:
        return NoCheckpoints()
    if cfg.parallel.backend == "deepspeed":
        from parallel.deepspeed import DeepSpeedCheckpoints

        return DeepSpeedCheckpoints(engine, run_dir / "checkpoints", keep_last=ck.keep_last)
    manager = CheckpointManager(
        run_dir / "checkpoints",
        keep_last=ck.keep_last,
        keep_every=ck.keep_every,
        async_save=ck.async_save,
        process_group=torch.distributed.group.WORLD if engine.info.distributed else None,
        timeout_s=cfg.parallel.timeout_s,
    )
    return EngineCheckpoints(manager, engine)


def write_resolved_config(cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


TrackerFactory = Callable[[RunConfig, DistInfo, Path, "str | None"], Any]


def build_trainer(
    cfg: RunConfig,
    info: DistInfo,
    tracker_factory: TrackerFactory | None = None,
    log: Callable[[str], None] = print,
) -> Trainer:
    """Everything the loop needs. ``tracker_factory(cfg, info, run_dir, run_id)`` makes the
    experiment tracker once the run id to continue (from a checkpoint) is known; ``None`` tracks
    nothing."""
    run_dir = Path(cfg.run.dir)
    write_resolved_config(cfg, run_dir, info)
    stages = build_stages(cfg, info)
    model = build_training_model(cfg, info)
    engine = build_engine(cfg, model, info)
    return Trainer(
        cfg=cfg,
        info=info,
        model=model,
        engine=engine,
        stages=stages,
        checkpoints=build_checkpoints(cfg, engine, run_dir),
        tracker_factory=lambda run_id: (
            tracker_factory(cfg, info, run_dir, run_id) if tracker_factory else None
        ),
        run_dir=run_dir,
        log=log if info.is_main else (lambda message: None),
    )


def run_training(
    cfg: RunConfig,
    tracker_factory: TrackerFactory | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """Initialise the process group from the launcher's environment, train, shut down."""
    info = init_distributed(cfg.train.device, timeout_s=cfg.parallel.timeout_s)
    try:
        return build_trainer(cfg, info, tracker_factory, log).run()
    finally:
        shutdown(info)
