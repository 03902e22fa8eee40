"""The trainer: one loop for every model family and parallel backend.

A step reads top to bottom: stage -> batches -> forward/backward with accumulation -> clip ->
optimizer step -> routing-bias update -> log -> checkpoint -> eval -> stop check. Everything
resumable (model, optimizer, data position, RNG, step, stage, MLflow run id) goes into one
checkpoint, so an interrupted and resumed run produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from data_pipeline.reader import StreamingReader, build_reader
from parallel.comm import CommStats
from parallel.dist import DistInfo, all_reduce_max, all_reduce_mean
from parallel.progress import ProgressBoard, is_peer_failure
from pretrain.backend import CheckpointStore, StepEngine, iter_after_step_hooks
from pretrain.checkpoint import capture_rng_state, restore_rng_state
from pretrain.config import RunConfig, config_to_dict
from pretrain.context_split import ContextSplit
from pretrain.curriculum import Stage, apply_stage
from pretrain.data_config import reader_config
from pretrain.evaluate import evaluate
from pretrain.exit_status import write_exit_status
from pretrain.flops import FlopCount, count_flops, device_peak_flops
from pretrain.history import METRICS_FILE, append_metrics, read_metrics, rewrite_metrics
from pretrain.loss import IGNORE_INDEX
from pretrain.metrics import component_metrics, peak_memory_gib, step_shares
from pretrain.models.lm import CausalLM
from pretrain.optim import lr_multiplier
from pretrain.plots import plot_training_curves
from pretrain.stop_signal import StopSignal

logger = logging.getLogger("pretrain")
# the trainer's progress lines (step, checkpoint, resume, stop); launch/logging_setup.py shows
# them on stdout, rank 0 only unless all ranks are asked for
console = logging.getLogger("pretrain.console")


def log_console(message: str) -> None:
    """The default ``Trainer.log``: one progress line through the ``pretrain.console`` logger."""
    console.info(message)


EVAL_SEED_OFFSET = 1_000_003  # synthetic held-out data: a seed no training stage uses
STAGE_SEED_STRIDE = 1_000  # each stage reads its own sample order
MAX_ROLLBACKS_TO_ONE_CHECKPOINT = 2  # then non-finite losses are not transient: stop
DATA_WAIT_SHOWN = 0.1  # the console line names the data wait from this share of the step on


class Tracker(Protocol):
    """The experiment tracker (``launch.tracking``): asynchronous, never blocks training."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_history(self, rows: list[dict[str, float]]) -> None: ...

    def wait_for_run(self, timeout_s: float) -> str | None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class RollbackImpossible(RuntimeError):
    """Repeated non-finite losses and no checkpoint to roll back to."""


@dataclass
class TrainState:
    """Counters that live in the checkpoint next to the model and optimizer."""

    step: int = 0  # optimizer steps done
    stage: int = 0  # index of the curriculum stage of the next step
    tokens: int = 0  # tokens trained on, all ranks together
    nonfinite_streak: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0  # corrupt samples the readers of finished stages skipped (rank's)
    mlflow_run_id: str | None = None


@dataclass
class Trainer:
    """Holds what the loop needs; built by ``build_trainer``."""

    cfg: RunConfig
    info: DistInfo
    model: CausalLM
    engine: StepEngine
    stages: list[Stage]
    checkpoints: CheckpointStore
    tracker_factory: Callable[[str | None], Tracker | None]  # MLflow run id to continue
    run_dir: Path
    log: Callable[[str], None] = log_console
    tracker: Tracker | None = None
    comm: CommStats = field(default_factory=CommStats)  # bytes per process group, per step
    split: ContextSplit = field(default_factory=lambda: ContextSplit(None))  # CP slice per rank
    state: TrainState = field(default_factory=TrainState)
    history: list[dict[str, float]] = field(default_factory=list)
    reader: StreamingReader | None = None
    reader_stage: int = -1
    batches: Iterator[dict[str, torch.Tensor]] | None = None
    stop: StopSignal = field(default_factory=StopSignal)
    progress: ProgressBoard = field(default_factory=ProgressBoard)  # names a hung rank
    # per (stage, block runs): its seq_len, and the depth a looped stack trains at
    _flops_per_token: dict[tuple[int, tuple[float, ...]], FlopCount] = field(default_factory=dict)
    _saved_step: int = -1
    _run_id_waited: bool = False
    _rollbacks_to: dict[int, int] = field(default_factory=dict)  # checkpoint step -> rollbacks
    _resumed_rows: list[dict[str, float]] = field(default_factory=list)  # for the tracker

    # ------------------------------------------------------------------ data

    def _open_stage_data(self, stage: Stage, state: dict | None = None) -> None:
        tc = self.cfg.train
        rcfg = reader_config(
            self.cfg.data,
            batch_size=tc.batch_size,
            seq_len=stage.seq_len,
            seed=tc.seed + STAGE_SEED_STRIDE * stage.index,
            vocab_size=self.cfg.model.vocab_size,
            mixture=stage.cfg.mixture or None,
        )
        self.reader = build_reader(rcfg, self.info.dp_rank, self.info.dp_world)
        if state is not None:
            self.reader.load_state_dict(state)
        self.reader_stage = stage.index
        self.batches = iter(self.reader)

    def _eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        tc = self.cfg.train
        rcfg = reader_config(
            self.cfg.data,
            batch_size=tc.batch_size,
            seq_len=tc.seq_len,
            seed=tc.seed + EVAL_SEED_OFFSET,
            vocab_size=self.cfg.model.vocab_size,
            split=self.cfg.data.eval_split,
        )
        reader = build_reader(rcfg, self.info.dp_rank, self.info.dp_world)
        for i, batch in enumerate(reader):
            if i >= tc.eval_batches:
                break
            yield batch

    # ------------------------------------------------------------------ the step

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        device = self.info.device
        return [
            {k: v.to(device, non_blocking=True) for k, v in next(self.batches).items()}
            for _ in range(self.cfg.train.grad_accum)
        ]

    def _global_count(self, value: float) -> float:
        return self._sum_over_ranks([value])[0]

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not self.info.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t)
        return t.tolist()

    def _autocast(self) -> torch.autocast:
        # bf16 on GPU; fp32 on CPU (exact comparisons in tests, and CPU bf16 matmuls are slow).
        on_gpu = self.info.device.type == "cuda"
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=on_gpu)

    def _forward_backward(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """Sum-of-token losses normalised by the global token count of the whole step, so that any
        split over ranks and micro-batches gives the gradient of the same global mean."""
        split = [self.split(b) for b in micro]  # this rank's slice of each row (CP), or all
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b, _ in split)
        global_tokens = max(self._global_count(local_tokens), 1.0)
        # DDP/FSDP average gradients over every rank (data- and context-parallel alike)
        scale = self.info.world_size / global_tokens
        loss_sum, aux_sum = 0.0, 0.0
        for i, (batch, context) in enumerate(split):
            with self.engine.accumulate(is_last=i == len(micro) - 1):
                with self._autocast():
                    out = self.engine.module(
                        batch["input_ids"], seq_idx=batch["seq_idx"], context=context
                    )
                token_loss = torch.nn.functional.cross_entropy(
                    out.logits.float().flatten(0, 1),
                    batch["labels"].flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                aux = out.aux_loss / len(micro)
                self.engine.backward(token_loss * scale + aux)
            loss_sum += token_loss.item()
            aux_sum += aux.item()
        loss = self._global_count(loss_sum) / global_tokens
        # the MoE aux loss is a function of the global batch; its mean over ranks is its value
        aux_mean = all_reduce_mean(aux_sum, self.info)
        return loss, aux_mean, local_tokens

    def _after_optimizer_step(self, stepped: bool) -> None:
        """Components' once-per-step work (MoE: global load, routing-bias update)."""
        for hook in iter_after_step_hooks(self.model):
            hook(stepped)

    def train_step(self, stage: Stage) -> dict[str, float]:
        t0 = time.perf_counter()
        tc = self.cfg.train
        lr = tc.lr * lr_multiplier(self.state.step, tc) * stage.cfg.lr_factor
        for group in self.engine.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # the input pipeline's cost: this rank's wait for the reader and the host->device copy
        data_t0 = time.perf_counter()
        micro = self._micro_batches()
        data_wait_s = time.perf_counter() - data_t0
        self.progress.enter(self.state.step + 1, "forward/backward")
        loss, aux, _ = self._forward_backward(micro)
        self.progress.enter(self.state.step + 1, "loss check, clipping, optimizer step")
        finite = all_reduce_max(0.0 if math.isfinite(loss) else 1.0, self.info) == 0.0
        grad_norm = float("nan")
        if finite:
            grad_norm = self.engine.clip_grad_norm(tc.grad_clip)
            finite = math.isfinite(grad_norm)
        if finite:
            self.engine.step()
            self.state.nonfinite_streak = 0
        else:
            self.engine.skip_step()
            self.state.nonfinite_streak += 1
            self.state.skipped_steps += 1
        self.progress.enter(self.state.step + 1, "after-step hooks (MoE load all-reduce)")
        self._after_optimizer_step(stepped=finite)
        component = component_metrics(self.model) if self._is_log_step() else {}
        component.update(self.comm.metrics())
        self.comm.reset()
        tokens = sum(b["input_ids"].numel() for b in micro) * self.info.dp_world  # whole rows
        self.state.step += 1
        self.state.tokens += tokens
        elapsed = time.perf_counter() - t0
        metrics = {
            "loss": loss,
            "aux_loss": aux,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "stage": float(stage.index),
            "tokens": float(self.state.tokens),
            "skipped": 0.0 if finite else 1.0,
            # corrupt samples this rank's readers skipped, whole run (see docs/data.md)
            "data/skipped_samples": float(self._skipped_samples()),
            # rank 0's wait for its batches; a slow peer's shows as collective time instead
            "data/wait_s": data_wait_s,
            "data/wait_share": data_wait_s / elapsed,
            **component,
            **step_shares(component, elapsed),
        }
        metrics.update(self._throughput_metrics(stage, tokens / elapsed))
        return metrics

    def _skipped_samples(self) -> int:
        return self.state.skipped_samples + (self.reader.skipped if self.reader is not None else 0)

    def _throughput_metrics(self, stage: Stage, tokens_per_s: float) -> dict[str, float]:
        # a looped stack may train at another depth each step: count what this step ran
        runs = tuple(self.model.stack.runs_per_forward(training=True).values())
        flops = self._flops_per_token.get((stage.index, runs))
        if flops is None:
            flops = count_flops(self.model, stage.seq_len, training=True)
            self._flops_per_token[(stage.index, runs)] = flops
        out = {"peak_memory_gib": peak_memory_gib(self.info.device)}
        peak = self.cfg.train.peak_tflops
        peak_flops = peak * 1e12 if peak else None
        if peak_flops is None and self.info.device.type == "cuda":
            peak_flops = device_peak_flops(torch.cuda.get_device_name(self.info.device))
        # executed FLOPs (recomputation included): what the hardware did
        executed = flops.train_per_token * tokens_per_s / self.info.world_size
        out["tflops_per_device"] = executed / 1e12
        if peak_flops:
            # mfu counts model FLOPs (3x forward), hfu the executed ones
            out["mfu"] = (
                flops.model_train_per_token * tokens_per_s / (peak_flops * self.info.world_size)
            )
            out["hfu"] = executed / peak_flops
        return out

    def _is_log_step(self) -> bool:
        step = self.state.step + 1
        return step % self.cfg.train.log_every == 0 or step in (1, self.cfg.train.steps)

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, Any]:
        return {
            "train_state": self.state.__dict__.copy(),
            "data": self.reader.state_dict() if self.reader is not None else None,
            "data_stage": self.reader_stage,
            "rng": capture_rng_state(),
            "config": config_to_dict(self.cfg),
        }

    def _shared_run_id(self) -> str | None:
        """Rank 0's MLflow run id, so every rank's checkpoint can continue the same run."""
        run_id = self.state.mlflow_run_id
        if self.tracker is not None:
            # A new run is created in the background; give it a moment so the checkpoint can
            # name it (a store that stays down leaves None: the resume then starts a new run).
            wait_s = 0.0 if self._run_id_waited else self.cfg.tracking.run_id_wait_s
            self._run_id_waited = True  # wait once per process, not at every checkpoint
            run_id = self.tracker.run_id or self.tracker.wait_for_run(wait_s)
        if self.info.distributed:
            box = [run_id]
            dist.broadcast_object_list(box, src=0)
            run_id = box[0]
        return run_id or self.state.mlflow_run_id

    def save_checkpoint(self) -> None:
        """Checkpoint the current step (once: a step that is already saved is not saved again)."""
        if self._saved_step == self.state.step or not self.cfg.checkpoint.enabled:
            return
        self.progress.enter(self.state.step, "checkpoint save")
        self.state.mlflow_run_id = self._shared_run_id()
        self.checkpoints.save(self.state.step, self._extra_state())
        self._saved_step = self.state.step  # only once saved: a failed save is not a checkpoint
        self.log(f"checkpoint saved at step {self.state.step}")

    def maybe_resume(self) -> None:
        extra = self.checkpoints.load_latest() if self.cfg.checkpoint.resume else None
        if extra is None:  # a fresh start: rows of an earlier run in this dir would repeat steps
            self._truncate_metrics_file(0)
            return
        self.state = TrainState(**extra["train_state"])
        self._saved_step = self.state.step
        restore_rng_state(extra["rng"])
        self._resumed_rows = self._truncate_metrics_file(self.state.step)
        stage = self._stage_for(self.state.step)
        if extra.get("data") is not None and extra.get("data_stage") == stage.index:
            self._open_stage_data(stage, extra["data"])
        self.log(f"resumed from step {self.state.step} (stage {stage.index}: {stage.cfg.name})")

    def _rollback(self) -> None:
        """Repeated non-finite losses: reload the last checkpoint's weights and optimizer, keep
        the data moving forward (replaying the same batches would fail the same way)."""
        reader_state = self.reader.state_dict() if self.reader is not None else None
        extra = self.checkpoints.load_latest()
        if extra is None:
            raise RollbackImpossible(
                f"{self.state.nonfinite_streak} non-finite losses in a row at step"
                f" {self.state.step} and no checkpoint to roll back to"
            )
        kept = self.state
        target = extra["train_state"]["step"]
        self._rollbacks_to[target] = self._rollbacks_to.get(target, 0) + 1
        if self._rollbacks_to[target] > MAX_ROLLBACKS_TO_ONE_CHECKPOINT:
            raise RollbackImpossible(
                f"non-finite losses keep coming back after {MAX_ROLLBACKS_TO_ONE_CHECKPOINT}"
                f" rollbacks to step {target}; giving up (lower the LR,"
                " check the data)"
            )
        self.state = TrainState(**extra["train_state"])
        self.state.skipped_steps = kept.skipped_steps
        self.state.mlflow_run_id = kept.mlflow_run_id
        self._open_stage_data(self._stage_for(self.state.step), reader_state)
        self.log(f"rolled back to step {self.state.step} after repeated non-finite losses")

    # ------------------------------------------------------------------ the loop

    def _stage_for(self, step: int) -> Stage:
        return apply_stage(self.model, self.stages, min(step, self.cfg.train.steps - 1))

    def _record(self, row: dict[str, float]) -> None:
        """Keep the row in memory and append it to ``metrics.jsonl`` (rank 0): the loss curve
        survives the process, and floats are written exactly (repr round-trips)."""
        self.history.append(row)
        if self.info.is_main:
            append_metrics(self.run_dir / METRICS_FILE, row)

    def _truncate_metrics_file(self, step: int) -> list[dict[str, float]]:
        """Rewrite ``metrics.jsonl`` (rank 0) to the rows of steps <= ``step``, the checkpoint
        being resumed (0: a fresh start keeps nothing); steps the interrupted run did past it are
        trained again. Returns the kept rows: the history MLflow is brought up to date from."""
        path = self.run_dir / METRICS_FILE
        if not (self.info.is_main and path.exists()):
            return []
        kept = [row for row in read_metrics(path) if row["step"] <= step] if step > 0 else []
        rewrite_metrics(path, kept)
        return kept

    def _log(self, metrics: dict[str, float]) -> None:
        step = self.state.step
        self._record({"step": step, **metrics})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)
        if step % self.cfg.train.log_every == 0 or step in (1, self.cfg.train.steps):
            mfu = f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            share = metrics.get("data/wait_share", 0.0)
            wait = f" | data wait {share:.0%}" if share >= DATA_WAIT_SHOWN else ""
            self.log(
                f"step {step:>6d} | stage {int(metrics['stage'])} | loss {metrics['loss']:.4f}"
                f" | aux {metrics['aux_loss']:.4f} | grad_norm {metrics['grad_norm']:.3f}"
                f" | lr {metrics['lr']:.2e} | tokens/s {metrics['tokens_per_s']:,.0f}{mfu}{wait}"
            )

    def _maybe_evaluate(self) -> None:
        every = self.cfg.train.eval_every
        if every and (self.state.step % every == 0 or self.state.step == self.cfg.train.steps):
            self.progress.enter(self.state.step, "evaluation")
            results = evaluate(
                self.engine.module,
                self._eval_batches(),
                self.info.device,
                split=self.split,
                sum_over_ranks=self._sum_over_ranks,
            )
            # global sums are equal on every rank already; per-group accuracies are averaged
            results = {k: all_reduce_mean(v, self.info) for k, v in results.items()}
            self._record({"step": self.state.step, **results})
            if self.tracker is not None:
                self.tracker.log_metrics(results, step=self.state.step)
            shown = " | ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "eval/tokens")
            self.log(f"eval at step {self.state.step} | {shown}")

    def run(self) -> list[dict[str, float]]:
        """Train until train.steps (or a stop signal); returns the logged metrics.

        Raises:
            CollectiveFailure: a collective timed out or lost a peer (the message names this
                rank, the phase and step, and the ranks that were elsewhere).
        """
        owns_handler = not self.stop.installed  # an entry point's handler stays to the exit
        self.stop.install()
        status, peers_lost = "FAILED", False
        try:
            self._write_exit_status("running")
            self.maybe_resume()
            self.tracker = self.tracker_factory(self.state.mlflow_run_id)
            resumed_rows, self._resumed_rows = self._resumed_rows, []
            if self.tracker is not None:
                # points up to the checkpoint that a hard kill kept from the store: sent now
                self.tracker.log_history(resumed_rows)
                if self.state.step == 0:
                    self.tracker.log_params(config_to_dict(self.cfg))
                self.tracker.log_artifact(self.run_dir / "config.yaml")  # this start's config
            status = self._loop()
            if self.state.step > 0:  # a stop before the first step of a fresh run saves nothing
                self.save_checkpoint()
            self._write_plots()
            self._write_exit_status("preempted" if status == "KILLED" else "finished")
            return self.history
        except Exception as err:
            peers_lost = self.info.distributed and is_peer_failure(err)
            failure = self.progress.failure(err) if peers_lost else err
            self._write_exit_status("failed", error=str(failure), retryable=peers_lost)
            if peers_lost:  # say who stopped answering, and where
                raise failure from err
            raise
        finally:
            if owns_handler:
                self.stop.uninstall()
            if not peers_lost:  # an async save's collectives would only wait out the timeout
                self.checkpoints.wait()
            if self.tracker is not None:
                self.tracker.close(status=status)

    def _loop(self) -> str:
        """Steps until the end or a stop request; returns the MLflow run status to close with."""
        total = self.cfg.train.steps
        while self.state.step < total:
            self.progress.enter(self.state.step, "stop check")
            if self._stop_requested():  # before each step: also a signal during start-up
                self.log(f"stop requested ({self.stop.requested}): checkpointing and exiting")
                return "KILLED"
            stage = self._stage_for(self.state.step)
            if stage.index != self.reader_stage:
                self._enter_stage(stage)
            self._log(self.train_step(stage))
            if self.state.nonfinite_streak >= self.cfg.train.max_nonfinite:
                self._rollback()
                continue
            every = self.cfg.checkpoint.every
            if every and self.state.step % every == 0:
                self.save_checkpoint()
            self._maybe_evaluate()
        return "FINISHED"

    def _enter_stage(self, stage: Stage) -> None:
        if self.reader_stage >= 0:  # a stage change, not the start of the run: checkpoint it
            self.log(f"stage {stage.index} ({stage.cfg.name}) starts at step {self.state.step}")
            self.save_checkpoint()
        else:
            self.log(f"stage {stage.index} ({stage.cfg.name}) from step {self.state.step}")
        self.state.stage = stage.index
        self.state.skipped_samples = self._skipped_samples()  # the new reader counts from 0
        self._open_stage_data(stage)
        if self.tracker is not None:
            self.tracker.log_metrics({"stage": float(stage.index)}, step=self.state.step)

    def _write_exit_status(self, status: str, **details: Any) -> None:
        """How this start ended, for requeue scripts (rank 0; see ``pretrain/exit_status.py``)."""
        if self.info.is_main:
            saved = self._saved_step if self._saved_step >= 0 else None
            write_exit_status(
                self.run_dir,
                status,
                self.state.step,
                checkpoint_step=saved,
                signal=self.stop.requested,
                **details,
            )

    def _write_plots(self) -> None:
        """Training curves of the whole run (resumes included) as a PNG, and an MLflow artifact."""
        if not (self.cfg.run.plot and self.info.is_main):
            return
        png = plot_training_curves(
            read_metrics(self.run_dir / "metrics.jsonl"),
            self.run_dir / "plots" / "training.png",
            title=self.cfg.run.name or self.run_dir.name,
        )
        self.log(f"training curves: {png}")
        if self.tracker is not None:
            self.tracker.log_artifact(png, "plots")

    def _stop_requested(self) -> bool:
        return all_reduce_max(1.0 if self.stop.requested else 0.0, self.info) > 0
