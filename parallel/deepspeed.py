"""DeepSpeed ZeRO 1/2/3 backend: the engine adapter the trainer steps through, and checkpoints.

DeepSpeed owns gradient accumulation boundaries, clipping and the optimizer step, so the adapter
maps the trainer's calls onto them:
- ``backward`` calls ``engine.backward(loss, scale_wrt_gas=False)``: the trainer already
  normalises the loss by the step's global token count;
- after every micro-batch but the last, ``engine.step()`` only advances DeepSpeed's micro-step
  counter (it must be called once per micro-batch);
- ``clip_grad_norm`` runs the boundary ``engine.step()`` (clip + update) and returns DeepSpeed's
  global grad norm; ``step`` is then a no-op;
- ``skip_step`` (non-finite loss) runs the boundary step with every LR set to 0 and zeroed
  gradients: the weights do not move; Adam's moments decay by one step (documented limitation).

Checkpoints use the engine's own sharded format (``save_checkpoint(tag)``) inside the
crash-consistent layout the DCP checkpoints use (``pretrain.checkpoint.root.CheckpointRoot``,
handed in): temporary directory, per-rank extra state, sha256 manifest written last, rename,
``latest``; at load every rank verifies and agrees before the engine loads, and falls back
together. The engine's own files load with ``weights_only=True`` (``WeightsOnlyCheckpointIO``).
DeepSpeed checkpoints load on the same world size only (use DeepSpeed's universal checkpoint
conversion to change it); the torch backends (``fsdp2``/``ddp``/``none``) reshard freely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from parallel.dist import DistInfo

logger = logging.getLogger("parallel")


def deepspeed_config(
    path: str, micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool
) -> dict:
    """The JSON config at ``path`` with the trainer-owned fields filled in from the run config."""
    with open(path) as f:
        cfg = json.load(f)
    owned = {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "train_batch_size",
    }
    clash = sorted(owned & set(cfg))
    if clash:
        raise ValueError(
            f"{path}: remove {clash}; they come from the run config (train.batch_size,"
            " train.grad_accum, train.grad_clip)"
        )
    cfg.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=grad_accum,
        gradient_clipping=grad_clip,
        bf16={"enabled": bf16},
    )
    return cfg


class DeepSpeedEngine:
    """Adapter with the same interface as ``parallel.engine.TorchEngine``."""

    def __init__(self, engine: Any, model: nn.Module, info: DistInfo) -> None:
        self.engine = engine
        self.module = engine  # forward goes through the engine (ZeRO-3 gathers params)
        self.model = model
        self.optimizer = engine.optimizer
        self.info = info
        self._grad_norm = float("nan")

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        yield
        if not is_last:
            self.engine.step()  # not a boundary: only advances the micro-step counter

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> float:
        self.engine.step()  # the boundary: clip (gradient_clipping) and update
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self) -> None:
        """Done by ``clip_grad_norm`` (DeepSpeed clips and steps in one call)."""

    def skip_step(self) -> None:
        saved = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        self.engine.zero_grad()
        self.engine.step()
        for g, lr in zip(self.optimizer.param_groups, saved):
            g["lr"] = lr

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


def build_deepspeed_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config_path: str,
    micro_batch: int,
    grad_accum: int,
    grad_clip: float,
    mixed_precision: bool,
    info: DistInfo,
) -> DeepSpeedEngine:
    """Wrap ``model`` and its optimizer (our AdamW parameter groups) in a DeepSpeed engine."""
    import deepspeed

    bf16 = info.device.type == "cuda" and mixed_precision
    ds_cfg = deepspeed_config(config_path, micro_batch, grad_accum, grad_clip, bf16=bf16)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    stage = engine.zero_optimization_stage()
    logger.info("DeepSpeed ZeRO stage %s over %d ranks", stage, info.world_size)
    return DeepSpeedEngine(engine, model, info)


# Classes DeepSpeed pickles into its ZeRO optimizer files; loading them with weights_only=True
# needs them allowlisted (listed by torch.serialization.get_unsafe_globals_in_checkpoint on
# ZeRO 1/2/3 checkpoints; DynamicLossScaler is what fp16 training writes instead of LossScaler).
_DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes ``weights_only`` loads of its checkpoint files must allow."""
    import importlib

    return [getattr(importlib.import_module(mod), name) for mod, name in _DEEPSPEED_SAFE_GLOBALS]


class WeightsOnlyCheckpointIO:
    """DeepSpeed's ``TorchCheckpointEngine`` with fsynced saves and ``weights_only=True`` loads.

    DeepSpeed itself loads every checkpoint file with ``torch.load(weights_only=False)`` (its
    ``TorchCheckpointEngine.load``), which runs arbitrary pickled code. Everything else (create,
    commit, which rank writes) is delegated to the engine it wraps.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._safe_globals = deepspeed_safe_globals()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        # fsync before the directory is renamed: a crash must not publish unwritten data
        with open(path, "wb") as f:
            torch.save(
                state_dict, f, _use_new_zipfile_serialization=self.inner.zipfile_serialization
            )
            f.flush()
            os.fsync(f.fileno())

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(self._safe_globals):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine: Any) -> bool:
    """Route a DeepSpeed engine's checkpoint file I/O through ``WeightsOnlyCheckpointIO``.

    Returns False (and warns) when the config picked another checkpoint writer (fast, decoupled,
    datastates): those keep DeepSpeed's own ``weights_only=False`` loads.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, WeightsOnlyCheckpointIO):
        return True
    if type(current) is not TorchCheckpointEngine:
        logger.warning(
            "DeepSpeed checkpoint engine %s loads its files with torch.load(weights_only=False);"
            " the manifest's sha256 sums still guard them",
            type(current).__name__,
        )
        return False
    engine.checkpoint_engine = WeightsOnlyCheckpointIO(current)
    return True


class CheckpointLayout(Protocol):
    """What ``DeepSpeedCheckpoints`` needs of ``pretrain.checkpoint.root.CheckpointRoot`` (handed
    in by the backend: ``parallel`` does not import ``pretrain``)."""

    root: Path

    def begin(self, step: int) -> Path: ...

    def write_extra(self, tmp: Path, extra: dict[str, Any]) -> None: ...

    def publish(
        self,
        step: int,
        tmp: Path,
        check_complete: Callable[[Path, dict[str, dict[str, Any]]], None],
    ) -> None: ...

    def load_newest(
        self, load: Callable[[Path, dict[str, Any]], str | None]
    ) -> dict[str, Any] | None: ...


class DeepSpeedCheckpoints:
    """The engine's own sharded checkpoints, written and verified as ``layout`` prescribes.

    Save: ``layout.begin`` makes ``.tmp-step_N/``; each rank's extra state goes in; the engine
    saves with that directory as its tag (DeepSpeed's file names do not contain the tag, so the
    directory can be renamed); ``layout.publish`` hashes, writes the manifest last, renames it to
    ``step_N/``, moves ``latest`` (DeepSpeed's format: the tag) and prunes.

    Load: ``layout.load_newest`` verifies each candidate on every rank and agrees; the engine then
    loads that tag on every rank, and a failure on any rank sends all of them to the previous one.
    """

    def __init__(self, engine: DeepSpeedEngine, layout: CheckpointLayout) -> None:
        self.engine = engine
        self.layout = layout
        use_weights_only_loads(engine.engine)

    def save(self, step: int, extra: dict[str, Any]) -> None:
        tmp = self.layout.begin(step)
        self.layout.write_extra(tmp, extra)  # first: a refused extra fails before the big write
        self.engine.engine.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)
        self.layout.publish(step, tmp, self._check_complete)

    def load_latest(self) -> dict[str, Any] | None:
        return self.layout.load_newest(self._load)

    def wait(self) -> None:
        """DeepSpeed saves synchronously."""

    def _check_complete(self, tmp: Path, records: dict[str, dict[str, Any]]) -> None:
        """The engine's model states and, under ZeRO, every rank's optimizer partition."""
        missing = [] if any(n.endswith("model_states.pt") for n in records) else ["model states"]
        if self.engine.engine.zero_optimization():
            for rank in range(self.engine.info.world_size):
                part = f"zero_pp_rank_{rank}_"
                if not any(part in n and n.endswith("optim_states.pt") for n in records):
                    missing.append(f"rank {rank}'s ZeRO optimizer states")
        if missing:
            raise RuntimeError(f"DeepSpeed checkpoint {tmp} is incomplete: missing {missing}")

    def _load(self, path: Path, manifest: dict[str, Any]) -> str | None:
        saved, world = int(manifest["world_size"]), self.engine.info.world_size
        if saved != world:
            return (
                f"saved by {saved} ranks, this run has {world}: DeepSpeed checkpoints load on the"
                " same world size only (DeepSpeed's universal checkpoint conversion changes it)"
            )
        loaded, _ = self.engine.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            return f"rank {self.engine.info.rank}: DeepSpeed found no checkpoint files"
        return None
