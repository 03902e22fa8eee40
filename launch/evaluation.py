"""``hydra-pretrain eval``: score a checkpoint on held-out synthetic tasks and shards.

    hydra-pretrain eval --run runs/hydra-tiny                        # newest usable checkpoint
    hydra-pretrain eval --run runs/hydra-tiny --step 40 --tasks chaining_h2,fact_lookup
    hydra-pretrain eval --run runs/X --data data/corpus --split val --batches 16 --out eval.json
    hydra-pretrain eval --run runs/X --mlflow                        # also log to the run

Prints one JSON object (and writes it to ``--out``), with a progress bar over the tasks on
stderr. With ``--mlflow`` the numbers are logged as ``eval/<task>/<metric>`` (``eval/data/<metric>``
for shards) at the checkpoint's step to the MLflow run whose id the checkpoint holds, in the store
the run was tracked in, through the trainer's tracker (``launch.tracking.build_tracker``, attached:
the run is only added to, its status and params stay as they are, and no run is ever created); a
store that cannot be reached within ``--mlflow-timeout`` is a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("launch.evaluation")

MLFLOW_TIMEOUT_S = 30.0  # how long --mlflow waits for the store (the tracker retries meanwhile)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's flags."""
    parser.add_argument(
        "--run", required=True, help="run directory, its checkpoints/ or one step_XXXXXXXX dir"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument(
        "--data",
        default=None,
        help="prepared shard set for held-out loss and perplexity (default: none, tasks only)",
    )
    parser.add_argument("--split", default="val", help="split of --data to read")
    parser.add_argument(
        "--tasks",
        default="all",
        help="comma-separated eval tasks, 'all' or 'none'; an unknown name lists them",
    )
    parser.add_argument("--batches", type=int, default=8, help="batches per task and for --data")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="task row length (default: the run's)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where to evaluate; auto: cuda when available, else cpu",
    )
    parser.add_argument(
        "--out", default=None, help="also write the JSON here (default: stdout only)"
    )
    parser.add_argument(
        "--mlflow",
        action="store_true",
        help="log eval/* metrics to the run's MLflow run, through the run's tracker",
    )
    parser.add_argument(
        "--mlflow-timeout",
        type=float,
        default=MLFLOW_TIMEOUT_S,
        metavar="SECONDS",
        help="how long --mlflow waits for the store to take the metrics",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


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
    from pretrain.eval import EvalError, heldout_seed, load_checkpoint_model, shard_reader
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
    tasks, data = _evaluate(args, model, specs, seq_len, device, seed, reader)
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
        "tasks": tasks,
        "skipped_tasks": skipped,
    }
    if data is not None:
        report["data"] = data
    return report, loaded


def _evaluate(
    args: argparse.Namespace,
    model: Any,
    specs: list,
    seq_len: int,
    device: Any,
    seed: int,
    reader: Any,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(task results, held-out shard results or None), one task at a time under a progress
    bar on stderr (each task's rows depend on its spec and ``seed`` alone: the same numbers as
    all tasks in one ``evaluate_tasks`` call)."""
    from tqdm import tqdm

    from pretrain.eval import evaluate_shards, evaluate_tasks

    tasks: dict[str, Any] = {}
    data = None
    total = len(specs) + (reader is not None)
    with tqdm(
        total=total, desc="eval", unit="task", file=sys.stderr, disable=args.no_progress
    ) as bar:
        for spec in specs:
            bar.set_postfix_str(spec.name)
            tasks.update(
                evaluate_tasks(
                    model, [spec], seq_len, args.batches, device, batch_size=args.batch_size,
                    seed=seed,
                )
            )  # fmt: skip
            bar.update()
        if reader is not None:
            bar.set_postfix_str(f"{args.data} ({args.split})")
            data = evaluate_shards(model, reader, args.batches, device)
            bar.update()
    return tasks, data


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
    metrics: dict[str, float],
    run_id: str | None,
    tracking_uri: str,
    step: int,
    *,
    run_dir: Path | None = None,
    timeout_s: float = MLFLOW_TIMEOUT_S,
) -> dict[str, Any]:
    """Add ``metrics`` at ``step`` to an existing MLflow run through the trainer's tracker
    (``build_tracker``, attached to ``run_id``); never raises.

    Args:
        metrics: flat ``eval/...`` metrics (``eval_metrics``).
        run_id: the run the checkpoint holds (None: nothing is logged).
        tracking_uri: the store the run was tracked in.
        step: the checkpoint's step.
        run_dir: the run directory (the tracker follows a moved one's artifacts; default: cwd).
        timeout_s: the most seconds to wait for the store; the tracker retries meanwhile.

    Returns:
        {``logged``: bool, ``run_id``, ``tracking_uri``, and ``reason`` when nothing was logged}.
    """
    from launch.tracking import MlflowTracker, build_tracker

    status: dict[str, Any] = {"logged": False, "run_id": run_id, "tracking_uri": tracking_uri}
    if run_id is None:
        status["reason"] = "the checkpoint holds no MLflow run id (was the run tracked?)"
        return status
    # the tracker would create an empty store at a sqlite path that does not exist
    db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():
        status["reason"] = f"no MLflow store at {db}"
        return status
    tracker = build_tracker(
        enabled=True,
        run_dir=run_dir or Path.cwd(),
        experiment="",  # attached: the run exists, no experiment or run is created
        run_name="",
        run_id=run_id,
        tracking_uri=tracking_uri,
        system_metrics=False,
        close_timeout_s=timeout_s,
        attach=True,
    )
    if not isinstance(tracker, MlflowTracker):  # it warned why (MLflow not importable)
        status["reason"] = "MLflow tracking is not available in this environment"
        return status
    tracker.log_metrics(metrics, step=step)
    tracker.close()
    if tracker.disabled or tracker.pending_metrics:
        status["reason"] = tracker.last_error or (
            f"{tracker.pending_metrics} metrics not sent within {timeout_s:g} s"
        )
        return status
    status["logged"] = True
    return status


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
        status = log_to_mlflow(
            eval_metrics(report),
            loaded.mlflow_run_id,
            uri,
            loaded.step,
            run_dir=run_dir,
            timeout_s=args.mlflow_timeout,
        )
        if not status["logged"]:
            logger.warning("eval metrics not logged to MLflow: %s", status["reason"])
        report["mlflow"] = status
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
