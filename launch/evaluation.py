"""``hydra-pretrain eval``: score a checkpoint on held-out synthetic tasks and shards.

    hydra-pretrain eval --run runs/hydra-tiny                        # newest usable checkpoint
    hydra-pretrain eval --run runs/hydra-tiny --step 40 --tasks chaining_h2,fact_lookup
    hydra-pretrain eval --run runs/X --data data/corpus --split val --batches 16 --out eval.json
    hydra-pretrain eval --run runs/X --mlflow                        # also log to the run

Prints one JSON object (and writes it to ``--out``). With ``--mlflow`` the numbers are logged as
``eval/<task>/<metric>`` (``eval/data/<metric>`` for shards) at the checkpoint's step to the
MLflow run whose id the checkpoint holds, in the store the run was tracked in. The run is only
added to (its status and params stay as they are); a store that cannot be reached is a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("launch.evaluation")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's flags."""
    parser.add_argument(
        "--run", required=True, help="run directory, its checkpoints/ or one step_XXXXXXXX dir"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--data", default=None, help="prepared shard set for held-out loss")
    parser.add_argument("--split", default="val", help="split of --data to read (default: val)")
    parser.add_argument(
        "--tasks",
        default="all",
        help="comma-separated eval tasks, 'all' (default) or 'none'; an unknown name lists them",
    )
    parser.add_argument("--batches", type=int, default=8, help="batches per task and for --data")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="task row length (default: the run's)"
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument(
        "--mlflow", action="store_true", help="log eval/* metrics to the run's MLflow run"
    )


def _task_names(arg: str) -> tuple[list[str], bool]:
    """(names, explicitly chosen) from ``--tasks``."""
    from pretrain.eval import EVAL_TASKS

    if arg == "all":
        return list(EVAL_TASKS), False
    if arg == "none":
        return [], True
    return [name.strip() for name in arg.split(",") if name.strip()], True


def _device(name: str) -> Any:
    import torch

    from pretrain.eval import EvalError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda but no CUDA device is available")
    return torch.device(name)


def _task_specs(args: argparse.Namespace, cfg: Any, seq_len: int) -> tuple[list, dict[str, str]]:
    """The runnable specs of ``--tasks``; a task named explicitly that cannot run is an error."""
    from pretrain.eval import EvalError, resolve_task_specs

    names, explicit = _task_names(args.tasks)
    specs, skipped = resolve_task_specs(names, cfg, cfg.model.vocab_size, seq_len)
    if explicit and skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise EvalError(f"task(s) cannot run here: {reasons}")
    for name, reason in skipped.items():
        logger.warning("eval task %s skipped: %s", name, reason)
    return specs, skipped


def build_report(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Load the checkpoint and evaluate it; returns (the JSON report, the loaded checkpoint)."""
    from pretrain.eval import (
        EvalError,
        evaluate_shards,
        evaluate_tasks,
        heldout_seed,
        load_checkpoint_model,
        shard_reader,
    )
    from pretrain.models.params import count_parameters

    if args.batches < 1 or args.batch_size < 1:
        raise EvalError("--batches and --batch-size must be >= 1")
    device = _device(args.device)
    loaded = load_checkpoint_model(args.run, args.step, device)
    cfg, model = loaded.cfg, loaded.model
    seq_len = args.seq_len or loaded.stage.seq_len
    specs, skipped = _task_specs(args, cfg, seq_len)
    seed = heldout_seed(cfg)
    reader = None
    if args.data:  # opened before any work: bad data fails at once
        vocab, max_len = cfg.model.vocab_size, cfg.model.max_seq_len
        reader = shard_reader(args.data, args.split, args.batch_size, seed, vocab, max_len)
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "step": loaded.step,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "family": cfg.model.family,
        "params": count_parameters(model).total,
        "stage": loaded.stage.cfg.name,
        "active_paths": sorted(loaded.stage.cfg.components),
        "device": str(device),
        "seq_len": seq_len,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "heldout_seed": seed,
        "tasks": evaluate_tasks(
            model, specs, seq_len, args.batches, device, batch_size=args.batch_size, seed=seed
        ),
        "skipped_tasks": skipped,
    }
    if reader is not None:
        report["data"] = evaluate_shards(model, reader, args.batches, device)
    return report, loaded


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a report as flat MLflow metrics ``eval/<task>/<metric>``."""
    metrics = {}
    sections = {**report["tasks"], **({"data": report["data"]} if "data" in report else {})}
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"eval/{section}/{key}"] = float(value)
    return metrics


def log_to_mlflow(
    metrics: dict[str, float], run_id: str | None, tracking_uri: str, step: int
) -> dict[str, Any]:
    """Add ``metrics`` at ``step`` to an existing MLflow run; never raises.

    Returns:
        {``logged``: bool, ``run_id``, ``tracking_uri``, and ``reason`` when nothing was logged}.
    """
    from launch.tracking.build import apply_http_defaults, is_remote_uri

    status: dict[str, Any] = {"logged": False, "run_id": run_id, "tracking_uri": tracking_uri}
    if run_id is None:
        status["reason"] = "the checkpoint holds no MLflow run id (was the run tracked?)"
        return status
    # MlflowClient would create an empty database at a sqlite path that does not exist
    db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():
        status["reason"] = f"no MLflow store at {db}"
        return status
    if is_remote_uri(tracking_uri):
        apply_http_defaults()  # one short attempt, not minutes of retries
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(tracking_uri=tracking_uri)
        client.get_run(run_id)  # fails for an unknown run: never create a new one here
        now = _now_ms()
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        client.log_batch(run_id, metrics=batch, synchronous=True)
    except Exception as exc:  # unreachable store, unknown run, driver missing: report it
        status["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        return status
    status["logged"] = True
    return status


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def run_eval(args: argparse.Namespace) -> int:
    """The ``eval`` subcommand: exit 0 with the JSON on stdout, 2 with a message on stderr."""
    from data_pipeline.errors import DataConfigError
    from launch.tracking.build import resolve_tracking_uri
    from pretrain.eval import EvalError

    try:
        report, loaded = build_report(args)
    except (EvalError, DataConfigError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    if args.mlflow:
        run_dir = loaded.run_dir or Path(loaded.cfg.run.dir)
        uri = resolve_tracking_uri(run_dir, loaded.cfg.tracking.uri)
        status = log_to_mlflow(eval_metrics(report), loaded.mlflow_run_id, uri, loaded.step)
        if not status["logged"]:
            print(
                f"warning: eval metrics not logged to MLflow: {status['reason']}", file=sys.stderr
            )
        report["mlflow"] = status
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
