"""Crash-consistent run history: ``metrics.jsonl`` matches the checkpoint on every start, survives a
torn last line, and a hard kill followed by a resume leaves MLflow with every step exactly once;
a kill while the MLflow store is being created does not keep the run dir from being tracked."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from parallel.dist import DistInfo
from pretrain.build import build_trainer
from pretrain.config import load_config
from pretrain.history import read_metrics, rewrite_metrics
from tests.pretrain.train_worker import stop_after
from tests.pretrain.trainer_helpers import FAST, TINY, logged_rows

pytestmark = pytest.mark.usefixtures("one_thread")

KILL_WORKER = Path(__file__).with_name("kill_worker.py")
REPO = Path(__file__).resolve().parents[2]
TRACKED = (
    "tracking.enabled=true",
    "tracking.system_metrics=false",
    "tracking.run_id_wait_s=600",  # returns as soon as the run exists; long only on a busy box
)


def _train(run_dir: Path, *overrides: str, stop_at: int = 0, tracked: bool = False):
    """A FAST tiny training in this process, checkpointing every 2 steps."""
    from launch.train import make_tracker

    cfg = load_config(TINY, [*FAST, "checkpoint.every=2", f"run.dir={run_dir}", *overrides])
    trainer = build_trainer(
        cfg, DistInfo(), tracker_factory=make_tracker if tracked else None, log=lambda m: None
    )
    if stop_at:
        stop_after(trainer, stop_at)
    trainer.run()
    return trainer


def _steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in logged_rows(run_dir) if "loss" in row]


# ---------------------------------------------------------------------- metrics.jsonl


def test_read_metrics_drops_a_partial_last_line_and_a_corrupt_middle_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": math.nan}, {"step": 3, "loss": 1.5}]
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, '{"step": 9, "lo\x00\x00')  # damage in the middle
    lines.insert(2, "[1, 2]")  # valid JSON, not a row
    path.write_text("\n".join(lines) + '\n{"step": 4, "loss": 1.2')  # torn append at the end
    with caplog.at_level(logging.WARNING, logger="pretrain.history"):
        got = read_metrics(path)
    assert [r["step"] for r in got] == [1, 2, 3] and math.isnan(got[1]["loss"])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "corrupt line (line 2" in messages[0] and "corrupt line (line 3" in messages[1]
    assert "partial last line (line 6" in messages[2] and str(path) in messages[2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_rewrite_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rewrite_metrics(path, [{"step": 1, "loss": 1.0}])

    def rows():
        yield {"step": 1, "loss": 1.0}
        raise RuntimeError("killed mid-rewrite")

    with pytest.raises(RuntimeError):
        rewrite_metrics(path, rows())
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]  # the old file, whole


def test_resume_rewrites_history_to_the_checkpoint_despite_a_torn_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _train(tmp_path, stop_at=3)  # checkpoint at step 3
    # what a hard kill after two more steps leaves: rows past the checkpoint, a torn last line
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": -1.0}\n{"step": 5, "loss": -1.0}\n{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="pretrain.history"):
        _train(tmp_path)
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert all(row["loss"] > 0 for row in logged_rows(tmp_path))  # the stale rows are gone
    assert any("partial last line" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


@pytest.mark.parametrize(
    "fresh", ["checkpoint.resume=false", "checkpoint.keep_last=3"], ids=["resume_off", "no_ckpt"]
)
def test_fresh_start_truncates_history(tmp_path: Path, fresh: str) -> None:
    _train(tmp_path, "checkpoint.enabled=false")  # an earlier run: rows, no checkpoint
    _train(tmp_path, fresh)  # resume=false, or nothing to resume: starts from step 0
    assert _steps(tmp_path) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------- MLflow after a kill


def _store_history(run_dir: Path) -> tuple[object, dict[str, list[tuple[int, float]]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
    }
    return run, history


def test_hard_kill_then_resume_leaves_every_step_in_mlflow_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    import launch.tracking

    # the resumed run's close ends as soon as all is sent; a busy machine must not cut it short
    patient = functools.partial(launch.tracking.build_tracker, close_timeout_s=300)
    monkeypatch.setattr(launch.tracking, "build_tracker", patient)
    # steps >= 3 never leave the tracker's buffer; SIGKILL once step 5 is recorded (checkpoint
    # at step 4), then a torn line from the dying write
    cmd = [
        sys.executable,
        str(KILL_WORKER),
        "3",
        "5",
        TINY,
        *FAST,
        "checkpoint.every=2",
        f"run.dir={tmp_path}",
        *TRACKED,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')
    _, before = _store_history(tmp_path)
    assert all(step < 3 for points in before.values() for step, _ in points)  # the holes

    _train(tmp_path, *TRACKED, tracked=True)

    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    run, history = _store_history(tmp_path)
    assert run.info.status == "FINISHED"
    recorded = {key for row in rows for key in row} - {"step"}
    assert recorded <= set(history)
    for key in recorded:
        in_file = [(r["step"], r[key]) for r in rows if key in r]
        steps = Counter(step for step, _ in history[key])
        assert all(n == 1 for n in steps.values()), (key, steps)  # no duplicates
        extra = {0} if key == "stage" else set()  # the stage is also logged as a stage starts
        assert set(steps) - extra == {s for s, _ in in_file}, key  # no holes
        if key == "loss":  # the store's values are the file's, the replayed ones included
            assert [v for s, v in history[key] if s not in extra] == [v for _, v in in_file]


def test_kill_while_creating_the_store_does_not_brick_it(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy")
    from mlflow import MlflowClient

    from launch.tracking import build_tracker

    # die by SIGKILL in the middle of MLflow's schema migrations (tables made, none upgraded)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import mlflow.store.db.utils as u\n"
        "u._upgrade_db = lambda engine: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from launch.tracking import build_tracker\n"
        "build_tracker(True, Path(sys.argv[1]), 'exp', 'r', system_metrics=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
    assert list(tmp_path.glob("mlflow.db.creating-*"))  # the half-made store, not in place

    tracker = build_tracker(True, tmp_path, "exp", "r", system_metrics=False, close_timeout_s=120)
    assert (tmp_path / "mlflow.db").exists()  # created before training starts
    assert not list(tmp_path.glob("mlflow.db.creating-*"))
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1]
