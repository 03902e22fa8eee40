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

Checkpoints use the engine's own sharded format (``save_checkpoint(tag)``), plus one
``extra_rank{r}.pt`` per rank (RNG, data position, counters); ``latest`` is written by rank 0 last.
DeepSpeed checkpoints load on the same world size only (use DeepSpeed's universal checkpoint
conversion to change it); the torch backends (``fsdp2``/``ddp``/``none``) reshard freely.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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


class DeepSpeedCheckpoints:
    """Engine checkpoints under ``root/step_XXXXXXXX`` with a ``latest`` pointer written last."""

    def __init__(self, engine: DeepSpeedEngine, root: Path, keep_last: int = 3) -> None:
        self.engine = engine
        self.root = Path(root)
        self.keep_last = keep_last

    def _barrier(self) -> None:
        if self.engine.info.distributed:
            dist.barrier()

    def save(self, step: int, extra: dict[str, Any]) -> None:
        tag = f"step_{step:08d}"
        self.engine.engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        torch.save(extra, self.root / tag / f"extra_rank{self.engine.info.rank}.pt")
        self._barrier()
        if self.engine.info.is_main:
            tmp = self.root / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / "latest")
            self._prune(keep=tag)
        self._barrier()

    def _tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")
        )

    def _prune(self, keep: str) -> None:
        for tag in self._tags()[: -self.keep_last]:
            if tag != keep:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def load_latest(self) -> dict[str, Any] | None:
        tags = self._tags()
        if not tags:
            return None
        latest = (
            (self.root / "latest").read_text().strip() if (self.root / "latest").exists() else None
        )
        order = ([latest] if latest in tags else []) + [t for t in reversed(tags) if t != latest]
        rank = self.engine.info.rank
        for tag in order:
            extra_path = self.root / tag / f"extra_rank{rank}.pt"
            try:
                path, _ = self.engine.engine.load_checkpoint(str(self.root), tag=tag)
                if path is None:
                    raise RuntimeError("DeepSpeed found no checkpoint files")
                return torch.load(extra_path, weights_only=False)
            except Exception as err:  # noqa: BLE001 - any failure means: try the previous one
                warnings.warn(
                    f"DeepSpeed checkpoint {self.root / tag} is unusable ({err}); trying the previous one",
                    stacklevel=2,
                )
        raise RuntimeError(f"no usable DeepSpeed checkpoint in {self.root} (tried {order})")

    def wait(self) -> None:
        """DeepSpeed saves synchronously."""
