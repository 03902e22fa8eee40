"""Load a trained model from a run's checkpoint (DCP, or DeepSpeed's engine checkpoint), read-only,
in one process.

``load_checkpoint_model`` accepts a run directory (``runs/X``, holding ``checkpoints/``), a
checkpoint root (``runs/X/checkpoints``) or one checkpoint (``runs/X/checkpoints/step_00000080``).
Without a step it takes the newest checkpoint that verifies (manifest, sizes, sha256, extra state,
DCP load), skipping bad ones with a warning, as a resuming trainer would; with a step it takes that
one or fails. The config comes from the checkpoint itself (``run.dir/config.yaml`` may belong to
a later run), and the model is switched to the curriculum stage of its last trained step.

Unlike ``CheckpointManager.load_latest`` this never writes: the manager removes ``.tmp-*``
leftovers, which, next to a training job that is saving, would be the save in progress.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from kernels.backends import select_backends
from pretrain.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    ModelOptimizerState,
    files,
    verify,
)
from pretrain.checkpoint.deepspeed_weights import load_deepspeed_weights
from pretrain.checkpoint.model_state import prepare_load
from pretrain.checkpoint.state import load_extra
from pretrain.config import RunConfig, from_dict, validate_run_config
from pretrain.config_errors import ConfigError
from pretrain.curriculum import Stage, apply_stage, resolve_stages
from pretrain.eval.errors import EvalError
from pretrain.models import build_model
from pretrain.models.kernel_backends import apply_kernel_backends
from pretrain.models.lm import CausalLM

logger = logging.getLogger("pretrain.eval")


@dataclass
class LoadedCheckpoint:
    """A model restored from a checkpoint, with what an evaluation needs to know about it."""

    model: CausalLM  # on its device, in eval mode, paths as at the last trained step
    cfg: RunConfig  # the run config saved in the checkpoint
    path: Path  # the step_XXXXXXXX directory
    step: int  # optimizer steps trained
    stage: Stage  # the curriculum stage of the last trained step
    run_dir: Path | None  # the run directory (parent of checkpoints/), when the layout shows it
    mlflow_run_id: str | None  # the MLflow run of the training, if it was tracked
    world_size: int  # ranks that wrote the checkpoint


def _checkpoint_root(path: Path) -> tuple[Path, Path | None]:
    """(root holding step_* directories, or the step directory itself; the run directory)."""
    if not path.exists():
        raise EvalError(f"checkpoint path {path} does not exist")
    if files.parse_step(path.name) is not None or (path / files.MANIFEST).is_file():
        root = path.parent
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    else:
        root = path
    return root, (root.parent if root.name == "checkpoints" else None)


def checkpoint_candidates(path: Path, step: int | None = None) -> tuple[list[Path], Path | None]:
    """Checkpoint directories to try, best first, and the run directory.

    Raises:
        EvalError: nothing that looks like a checkpoint at ``path``, or no checkpoint ``step``.
    """
    path = Path(path)
    root, run_dir = _checkpoint_root(path)
    if files.parse_step(path.name) is not None or (path / files.MANIFEST).is_file():
        found = files.parse_step(path.name)
        if step is not None and found != step:
            raise EvalError(f"{path} is the checkpoint of step {found}, not of --step {step}")
        return [path], run_dir
    dirs = files.step_dirs(root)
    if not dirs:
        raise EvalError(
            f"no checkpoints in {path} (expected a run directory holding checkpoints/, a"
            " checkpoints directory or a step_XXXXXXXX directory)"
        )
    if step is None:
        return dirs[::-1], run_dir
    wanted = root / files.step_dir_name(step)
    if wanted not in dirs:
        steps = [files.parse_step(d.name) for d in dirs]
        raise EvalError(f"no checkpoint of step {step} in {root}; available steps: {steps}")
    return [wanted], run_dir


def _verified_extra(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, rank 0's extra state) of a checkpoint whose files all check out."""
    problem, manifest = verify.read_checked_manifest(path, _written_by(path))
    if problem is None:
        problem = verify.check_files(path, manifest, rank=0, world=1, verify_hashes=True)
    if problem is not None:
        raise EvalError(problem)
    try:
        extra = load_extra(path / files.extra_name(0))
    except Exception as exc:
        raise EvalError(f"extra state unreadable: {exc}") from exc
    if not isinstance(extra, dict) or not isinstance(extra.get("config"), dict):
        raise EvalError("extra state holds no run config")
    return manifest, extra


def _restore(path: Path, device: torch.device) -> LoadedCheckpoint:
    """Verify and load one checkpoint directory (raises EvalError with the reason)."""
    manifest, extra = _verified_extra(path)
    try:
        cfg = from_dict(RunConfig, extra["config"])
        validate_run_config(cfg)
    except ConfigError as err:
        raise EvalError(f"the run config saved in it is not valid here: {err}") from None
    model = build_model(cfg.model, device=device)
    backends = select_backends({op: "auto" for op in ("ssd", "pkm", "moe", "attention")}, device)
    apply_kernel_backends(model, backends)
    if manifest.get("engine") == files.ENGINE_DEEPSPEED:
        _load_deepspeed(model, path)
    else:
        _load_dcp(model, path)
    state = extra.get("train_state", {})
    step = int(state.get("step", manifest["step"]))
    world = int(manifest["world_size"])
    tc = cfg.train
    stages = resolve_stages(
        cfg.curriculum, tc.steps, tc.seq_len, tc.batch_size * tc.grad_accum * world
    )
    stage = apply_stage(model, stages, min(max(step - 1, 0), tc.steps - 1))
    model.eval()
    return LoadedCheckpoint(
        model=model,
        cfg=cfg,
        path=path,
        step=step,
        stage=stage,
        run_dir=None,  # set by the caller, who knows the layout it was given
        mlflow_run_id=state.get("mlflow_run_id"),
        world_size=world,
    )


def _written_by(path: Path) -> str:
    """The engine that wrote checkpoint ``path`` (DCP when its manifest is unreadable: the
    manifest check then says why)."""
    try:
        return files.read_manifest(path).get("engine", files.ENGINE_DCP)
    except ValueError:
        return files.ENGINE_DCP


def _load_dcp(model: CausalLM, path: Path) -> None:
    view, planner = prepare_load({"model": ModelOptimizerState(model)})
    try:
        with warnings.catch_warnings():  # "assuming single process": that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(view, checkpoint_id=path, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's exception is a BaseException
        raise EvalError(f"loading the weights failed: {verify.describe(exc)}") from None


def _load_deepspeed(model: CausalLM, path: Path) -> None:
    """The fp32 weights merged from a DeepSpeed engine checkpoint (any ZeRO stage), strictly."""
    try:
        model.load_state_dict(load_deepspeed_weights(path), strict=True)
    except (CheckpointError, RuntimeError) as exc:
        raise EvalError(f"loading the weights failed: {exc}") from None


def load_checkpoint_model(
    path: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """The model of the newest usable checkpoint at ``path`` (or of ``step``), on ``device``.

    Args:
        path: a run directory, its ``checkpoints`` directory or a ``step_*`` directory.
        step: the optimizer step of the checkpoint to load; None: the newest that verifies.
        device: where to put the model.

    Raises:
        EvalError: no checkpoint there, the requested one is missing or corrupt, or none of the
            checkpoints is usable (the message names each and why).
    """
    candidates, run_dir = checkpoint_candidates(Path(path), step)
    device = torch.device(device)
    failures = []
    for candidate in candidates:
        try:
            loaded = _restore(candidate, device)
        except EvalError as err:
            failures.append(f"{candidate}: {err}")
            if len(candidates) > 1:
                warnings.warn(f"checkpoint {candidate} skipped: {err}", CheckpointWarning, 2)
            continue
        loaded.run_dir = run_dir
        if failures:
            logger.warning(
                "evaluating %s after skipping %d bad checkpoint(s)", candidate, len(failures)
            )
        return loaded
    raise EvalError("no usable checkpoint:\n  " + "\n  ".join(failures))
