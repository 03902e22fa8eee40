"""Build a ``Trainer`` from a run config: small ``build_*`` steps in the order they depend on.

layout check -> distributed init -> device mesh -> stages -> model (+ kernel backends) ->
backend: parallelism, optimizer and engine -> checkpoints -> tracker factory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from kernels.backends import select_backends
from parallel.context import ContextGroup
from parallel.dist import (
    DistInfo,
    init_distributed,
    launcher_rank,
    launcher_world_size,
    shutdown,
)
from parallel.mesh import ParallelMesh
from parallel.progress import ProgressBoard, is_peer_failure
from pretrain.allocator import log_malloc_policy
from pretrain.backend import (
    CheckpointStore,
    NoCheckpoints,
    ParallelBackend,
    StepEngine,
    resolve_backend,
)
from pretrain.config import KERNEL_BACKENDS, RunConfig, config_to_dict, resolve_parallel_dims
from pretrain.context_split import ContextSplit
from pretrain.curriculum import Stage, resolve_stages
from pretrain.exit_status import write_exit_status
from pretrain.models import build_model
from pretrain.models.kernel_backends import apply_kernel_backends
from pretrain.models.lm import CausalLM
from pretrain.preflight import preflight
from pretrain.stop_signal import StopSignal
from pretrain.trainer import Tracker, Trainer, log_console

logger = logging.getLogger("pretrain")


def build_stages(cfg: RunConfig, info: DistInfo) -> list[Stage]:
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum * info.dp_world
    return resolve_stages(cfg.curriculum, cfg.train.steps, cfg.train.seq_len, rows_per_step)


def build_training_model(cfg: RunConfig, info: DistInfo, compiled: bool | None = None) -> CausalLM:
    """The model on its device, seeded identically on every rank, with its kernel backends
    (chosen for compiled blocks when ``compiled``; default ``train.compile``)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, device=info.device)
    requested = {op: getattr(cfg.kernels, op) for op in KERNEL_BACKENDS}
    backends = select_backends(
        requested,
        info.device,
        deterministic=cfg.kernels.deterministic,
        compiled=cfg.train.compile if compiled is None else compiled,
    )
    apply_kernel_backends(model, backends)
    return model


def build_mesh(cfg: RunConfig, info: DistInfo) -> ParallelMesh:
    """The run's device mesh (validated layout; no mesh with one process)."""
    dims = resolve_parallel_dims(cfg, info.world_size)
    mesh = ParallelMesh(dims, info.device.type)
    if info.distributed:
        logger.info("device mesh: %s", dims.describe())
    log_malloc_policy()  # applied by the entry point, before logging was set up
    return mesh


def build_checkpoints(
    cfg: RunConfig, backend: ParallelBackend, engine: StepEngine, run_dir: Path
) -> CheckpointStore:
    if not cfg.checkpoint.enabled:
        return NoCheckpoints()
    return backend.build_checkpoints(engine, cfg, run_dir / "checkpoints")


def write_resolved_config(cfg: RunConfig, run_dir: Path, info: DistInfo) -> None:
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


TrackerFactory = Callable[[RunConfig, DistInfo, Path, "str | None"], Tracker | None]


def build_trainer(
    cfg: RunConfig,
    info: DistInfo,
    tracker_factory: TrackerFactory | None = None,
    log: Callable[[str], None] | None = None,
    stop: StopSignal | None = None,
) -> Trainer:
    """Everything the loop needs. ``tracker_factory(cfg, info, run_dir, run_id)`` makes the
    experiment tracker once the run id to continue (from a checkpoint) is known; ``None`` tracks
    nothing. ``log``: the progress lines (default: the ``pretrain.console`` logger on every rank,
    whose rank filter ``launch/logging_setup.py`` sets; a function given here is called on rank
    0 only). ``stop``: the entry point's signal handler (default: the trainer installs its own
    for the length of ``run``)."""
    run_dir = Path(cfg.run.dir)
    mesh = build_mesh(cfg, info)  # an impossible layout fails here, before anything is written
    info = info.with_mesh(mesh)
    write_resolved_config(cfg, run_dir, info)
    stages = build_stages(cfg, info)
    model = build_training_model(cfg, info)
    backend = resolve_backend(cfg.parallel.backend)
    engine = backend.build_engine(model, cfg, mesh, info)
    return Trainer(
        cfg=cfg,
        info=info,
        model=model,
        engine=engine,
        stages=stages,
        checkpoints=build_checkpoints(cfg, backend, engine, run_dir),
        comm=mesh.comm,
        split=ContextSplit(ContextGroup(mesh.cp.get_group(), mesh.comm) if mesh.cp else None),
        tracker_factory=lambda run_id: (
            tracker_factory(cfg, info, run_dir, run_id) if tracker_factory else None
        ),
        run_dir=run_dir,
        log=log_console if log is None else (log if info.is_main else (lambda message: None)),
        stop=stop or StopSignal(),
        progress=ProgressBoard(info.rank, info.world_size, info.timeout_s),
    )


def _start_and_train(
    cfg: RunConfig,
    tracker_factory: TrackerFactory | None,
    log: Callable[[str], None] | None,
    stop: StopSignal,
) -> list[dict[str, float]]:
    """Process group, trainer, run; ``exit_status.json`` covers a start that dies before the
    trainer runs (an older ``preempted`` left there would make a requeue script loop)."""
    run_dir, is_main = Path(cfg.run.dir), launcher_rank() == 0
    if is_main:
        write_exit_status(run_dir, "running", step=None)
    info = None
    try:
        try:
            info = init_distributed(cfg.train.device, timeout_s=cfg.parallel.timeout_s)
            trainer = build_trainer(cfg, info, tracker_factory, log, stop)
        except Exception as err:  # the trainer records its own failures from here on
            if is_main:
                write_exit_status(
                    run_dir, "failed", step=None, error=str(err), retryable=is_peer_failure(err)
                )
            raise
        return trainer.run()
    finally:
        if info is not None:
            shutdown(info)


def run_training(
    cfg: RunConfig,
    tracker_factory: TrackerFactory | None = None,
    log: Callable[[str], None] | None = None,
    stop: StopSignal | None = None,
) -> list[dict[str, float]]:
    """Initialise the process group from the launcher's environment, train, shut down.

    ``stop``: the handler an entry point installed first thing, kept to the process's exit (a
    signal during start-up then stops the run cleanly before its first step); without one, the
    handler is installed here, still before the process group and the model.

    Raises:
        ConfigError: an impossible parallel layout for the launcher's world size, before the
            process group starts (so every rank exits at once, and nothing is written).
    """
    own_handler = stop is None
    stop = stop or StopSignal().install()
    try:
        preflight(cfg)  # this machine, files, run dir: fails before anything is written
        resolve_parallel_dims(cfg, launcher_world_size())
        return _start_and_train(cfg, tracker_factory, log, stop)
    finally:
        if own_handler:
            stop.uninstall()
