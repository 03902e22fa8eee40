"""MLflow tracking: params/metrics/artifacts reach the store, resume continues the same run
without duplicate steps, and a dead or hanging store never blocks or kills the caller."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from launch.tracking import (  # noqa: E402
    MlflowTracker,
    NullTracker,
    Tracker,
    build_tracker,
    flatten_config,
    resolve_tracking_uri,
    sanitize_key,
)
from launch.tracking.session import MlflowSession  # noqa: E402

LOGGER = "launch.tracking"
# Port 9 (discard) on loopback: nothing listens, connections are refused.
DEAD_STORE = "http://127.0.0.1:9"
CONFIG = {
    "model": {"d_model": 64, "ssm": {"d_state": 16, "chunk": [8, 16]}},
    "optim": {"lr": 1e-3, "betas": (0.9, 0.95), "decay_norms": False},
    "curriculum": {"stages": [{"name": "backbone", "steps": 10}, {"name": "attn", "steps": 5}]},
    "run": {"name": None},
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_tracker sets MLflow HTTP defaults process-wide; record "absent" so they are undone.
    for name in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
    ):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated store: copying it saves the ~2 s schema migration per test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def run_dir(tmp_path: Path, template_db: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    shutil.copy(template_db, path / "mlflow.db")
    return path


def _client(run_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _messages(caplog: pytest.LogCaptureFixture, text: str, store: str | None = None) -> list[str]:
    """This logger's messages containing ``text``; with ``store``, only those about that tracking
    URI, so that a background thread an earlier test left retrying its own store (a close that
    timed out) cannot count here."""
    about = "" if store is None else f"tracking store {store} "
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and text in r.getMessage() and about in r.getMessage()
    ]


def _tracker(run_dir: Path, **kw) -> MlflowTracker:
    args = dict(
        enabled=True,
        run_dir=run_dir,
        experiment="exp",
        run_name="tiny",
        system_metrics=False,
        flush_interval_s=0.05,
    )
    args.update(kw)
    tracker = build_tracker(**args)
    assert isinstance(tracker, MlflowTracker) and isinstance(tracker, Tracker)
    return tracker


# ---------------------------------------------------------------------- params


def test_flatten_config_dotted_keys_lists_and_limits() -> None:
    @dataclasses.dataclass
    class Section:
        width: int = 4
        path: Path = Path("/data/x")

    flat = flatten_config({**CONFIG, "section": Section(), "empty": {}})
    assert flat["model.d_model"] == "64"
    assert flat["model.ssm.chunk"] == "[8, 16]"
    assert flat["optim.lr"] == "0.001"
    assert flat["optim.betas"] == "[0.9, 0.95]"
    assert flat["optim.decay_norms"] == "false"
    assert flat["curriculum.stages.1.name"] == "attn"
    assert flat["run.name"] == "null"
    assert flat["section.width"] == "4" and flat["section.path"] == "/data/x"
    assert flat["empty"] == "{}"
    assert flatten_config({"a": 1}, prefix="cfg") == {"cfg.a": "1"}

    long = flatten_config({"blob": "x" * 10_000, "k" * 300: 1, "k" * 299 + "j": 2, "a b@c": 3})
    assert len(long["blob"]) == 6000 and long["blob"].endswith("...[truncated]")
    keys = [k for k in long if k.startswith("kkk")]
    assert len(keys) == 2 and all(len(k) <= 250 for k in keys)
    assert "a b_c" in long
    assert sanitize_key("/a//b/../c/") == "a/b/_/c"


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch) -> None:
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(tmp_path) == "http://env:5000"
    assert resolve_tracking_uri(tmp_path, "http://arg:5000") == "http://arg:5000"


# ---------------------------------------------------------------------- a local run


def test_params_metrics_and_artifacts_reach_sqlite_store(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = _tracker(run_dir)
    tracker.log_params(CONFIG)
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1.0 / step, "lr": np.float32(0.5), "bad": "x"}, step=step)
    (run_dir / "config.yaml").write_text("model: {d_model: 64}\n")
    plots = run_dir / "plots"
    plots.mkdir()
    (plots / "loss.txt").write_text("curve")
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(plots, artifact_path="plots")
    tracker.close()
    tracker.close()  # idempotent

    client = _client(run_dir)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert run.data.params == flatten_config(CONFIG)
    assert _history(client, tracker.run_id, "loss") == [(s, 1.0 / s) for s in range(1, 6)]
    assert _history(client, tracker.run_id, "lr") == [(s, 0.5) for s in range(1, 6)]
    assert "bad" not in run.data.metrics
    assert len(_messages(caplog, "not a number")) == 1
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())
    names = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert names == {"config.yaml", "plots"}
    assert [f.path for f in client.list_artifacts(tracker.run_id, "plots")] == ["plots/loss.txt"]
    assert next((run_dir / "mlartifacts").rglob("loss.txt")).read_text() == "curve"


def test_resume_appends_to_same_run_and_skips_logged_steps(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    first = _tracker(run_dir)
    first.log_params(CONFIG)
    for step in range(10):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_metrics({"eval/loss": 7.0}, step=8)
    first.close(status="KILLED")  # e.g. preempted after its last checkpoint at step 6
    run_id = first.run_id

    # The trainer resumes from the checkpoint at step 6 and replays steps 7..9.
    second = _tracker(run_dir, run_id=run_id)
    assert second.run_id == run_id  # known before any store access: goes into checkpoints
    second.log_params(CONFIG)  # same values: accepted silently
    second.log_params({"optim": {"lr": 5.0}})  # changed: warned, first value kept
    for step in range(7, 15):
        second.log_metrics({"loss": 100.0 + step}, step=step)
    second.log_metrics({"eval/loss": 9.0}, step=8)  # replayed eval: dropped
    second.log_metrics({"eval/loss": 3.0}, step=12)
    second.log_metrics({"loss": -1.0}, step=12)  # a rollback replay in the same session
    second.close()

    client = _client(run_dir)
    assert second.run_id == run_id
    expected = [(s, float(s)) for s in range(10)] + [(s, 100.0 + s) for s in range(10, 15)]
    assert _history(client, run_id, "loss") == expected
    assert _history(client, run_id, "eval/loss") == [(8, 7.0), (12, 3.0)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001"
    assert _messages(caplog, "cannot change") and "optim.lr" in _messages(caplog, "cannot")[0]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_with_unknown_run_id_starts_a_new_run(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = _tracker(run_dir, run_id="0" * 32)
    tracker.log_history([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}])  # all of it
    tracker.log_metrics({"loss": 1.0}, step=3)
    new_id = tracker.wait_for_run(10)
    tracker.close()
    assert new_id is not None and new_id != "0" * 32 and tracker.run_id == new_id
    assert _history(_client(run_dir), new_id, "loss") == [(1, 0.5), (2, 0.25), (3, 1.0)]
    assert _messages(caplog, "not found")


def test_system_metrics_are_logged(run_dir: Path, monkeypatch) -> None:
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    tracker = _tracker(run_dir, system_metrics=True)
    run_id = tracker.wait_for_run(10)
    client = _client(run_dir)
    found = _wait_for(
        lambda: any(k.startswith("system/") for k in client.get_run(run_id).data.metrics), 10
    )
    tracker.close()
    assert found
    assert client.get_run(run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------- other ranks


def test_non_main_rank_and_disabled_write_nothing(tmp_path: Path) -> None:
    for kw in ({"is_main_process": False}, {"enabled": False}):
        args = {"enabled": True, "is_main_process": True, **kw}
        tracker = build_tracker(
            run_dir=tmp_path / "run", experiment="e", run_name="r", run_id="abc", **args
        )
        assert isinstance(tracker, NullTracker) and isinstance(tracker, Tracker)
        assert tracker.run_id == "abc"  # kept for the checkpoint
        tracker.log_params(CONFIG)
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_artifact(tmp_path / "missing.txt", artifact_path="plots")
        tracker.close(status="FAILED")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- failures


def test_unreachable_store_never_blocks_and_close_is_bounded(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tracker = _tracker(
        tmp_path / "run", tracking_uri=DEAD_STORE, close_timeout_s=2.0, max_buffered=100
    )
    tracker.log_params(CONFIG)
    tracker.log_artifact(tmp_path / "nothing.txt")
    # Never blocking is checked by what a blocking logger could not do, not by a speed: 300
    # steps finish while the store is being retried (a call that waited for MLflow's retries
    # would take seconds each); the deadline only catches a hang.
    logged = threading.Event()

    def log_all() -> None:
        for step in range(300):
            tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
            if step == 10:
                _wait_for(lambda: _messages(caplog, "unreachable", DEAD_STORE), 60)
        logged.set()

    threading.Thread(target=log_all, daemon=True).start()
    assert logged.wait(120), "log_metrics blocked on an unreachable store"
    assert _messages(caplog, "unreachable", DEAD_STORE)
    assert tracker.run_id is None
    assert tracker.dropped_metrics == 600 - 100 and tracker.pending_metrics <= 100
    assert len(_messages(caplog, "buffer full")) == 1

    closed = threading.Event()
    threading.Thread(target=lambda: (tracker.close(), closed.set()), daemon=True).start()
    assert closed.wait(60), "close() did not return: it must give up after close_timeout_s"
    assert len(_messages(caplog, "unreachable", DEAD_STORE)) == 1  # once, not per retry
    assert not (tmp_path / "run").exists()


def test_close_is_bounded_when_server_hangs(tmp_path: Path) -> None:
    # A socket that accepts connections (kernel backlog) but never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        tracker = _tracker(tmp_path / "run", tracking_uri=uri, close_timeout_s=1.0)
        # The server never answers: a logger or a close that waited for it would hang (MLflow's
        # HTTP timeout is minutes). The deadlines below only catch such a hang, not a speed.
        done = threading.Event()

        def log_then_close() -> None:
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.close()
            done.set()

        threading.Thread(target=log_then_close, daemon=True).start()
        assert done.wait(60), "log_metrics or close() waited on a server that never answers"
    finally:
        server.close()


class _FlakyClient:
    """A real client whose every call fails like a dead server while ``down`` is set."""

    def __init__(self, client: MlflowClient, down: threading.Event) -> None:
        self._client = client
        self._down = down

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)

        def call(*args, **kwargs):
            if self._down.is_set():
                raise MlflowException("API request failed: Connection refused")
            return attr(*args, **kwargs)

        return call


def test_outage_buffers_then_recovers_with_one_warning_each_way(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    down = threading.Event()
    session = MlflowSession(
        f"sqlite:///{run_dir / 'mlflow.db'}",
        "exp",
        "flaky",
        client_factory=lambda uri: _FlakyClient(MlflowClient(tracking_uri=uri), down),
    )
    tracker = MlflowTracker(session, flush_interval_s=0.05, close_timeout_s=10.0)
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert _wait_for(lambda: tracker.pending_metrics == 0)

    down.set()
    tracker.log_params({"late": {"param": 1}})
    for step in range(5, 10):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert _wait_for(lambda: _messages(caplog, "unreachable", store))
    time.sleep(0.3)  # several failed attempts while down
    assert tracker.pending_metrics == 5
    down.clear()
    assert _wait_for(lambda: _messages(caplog, "reachable again", store))
    for step in range(10, 12):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()

    assert len(_messages(caplog, "unreachable", store)) == 1
    assert len(_messages(caplog, "reachable again", store)) == 1
    client = _client(run_dir)
    assert _history(client, tracker.run_id, "loss") == [(s, float(s)) for s in range(12)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"late.param": "1"}


# ---------------------------------------------------------------------- history after a kill


class _HoldingClient:
    """A real client that holds every metric batch with a step >= ``hold_from`` (setting
    ``held``) until ``dead`` is set; from then on every call fails: a process killed with those
    points still in its buffer."""

    def __init__(self, client: MlflowClient, hold_from: int) -> None:
        self._client = client
        self._hold_from = hold_from
        self.held = threading.Event()
        self.dead = threading.Event()

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)

        def call(*args, **kwargs):
            if any(m.step >= self._hold_from for m in kwargs.get("metrics") or []):
                self.held.set()
                self.dead.wait(120)
            if self.dead.is_set():
                raise MlflowException("API request failed: Connection refused")
            return attr(*args, **kwargs)

        return call


def _log_rows(tracker: MlflowTracker, rows: list[dict]) -> None:
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def test_history_fills_what_a_killed_tracker_never_sent(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    store = f"sqlite:///{run_dir / 'mlflow.db'}"
    held = _HoldingClient(MlflowClient(tracking_uri=store), hold_from=3)
    session = MlflowSession(store, "exp", "killed", client_factory=lambda uri: held)
    metrics_file = run_dir / "metrics.jsonl"
    first = MlflowTracker(
        session, flush_interval_s=0.05, close_timeout_s=1.0, history_path=metrics_file
    )
    rows = [{"step": s, "loss": 1.0 / s, "lr": 0.1 * s} for s in range(1, 6)]
    _log_rows(first, rows[:2])
    assert _wait_for(lambda: first.pending_metrics == 0)  # steps 1, 2 reach the store
    _log_rows(first, rows[2:])
    assert held.held.wait(60)
    held.dead.set()  # killed: steps 3..5 never leave the buffer
    first.close(status="KILLED")
    unsent = _messages(caplog, "unsent at close")
    assert len(unsent) == 1 and "6 metric points" in unsent[0] and str(metrics_file) in unsent[0]
    run_id = first.run_id
    assert _history(_client(run_dir), run_id, "loss") == [(1, 1.0), (2, 0.5)]

    # The resume from the checkpoint at step 4 hands over metrics.jsonl up to it.
    second = _tracker(run_dir, run_id=run_id, close_timeout_s=120)  # ends once all is sent
    second.log_history(rows[:4])
    _log_rows(second, [{"step": 5, "loss": 105.0, "lr": 0.5}, {"step": 6, "loss": 106.0}])
    second.close()

    client = _client(run_dir)
    assert _history(client, run_id, "loss") == [
        *((s, 1.0 / s) for s in range(1, 5)),
        (5, 105.0),
        (6, 106.0),
    ]
    assert _history(client, run_id, "lr") == [*((s, 0.1 * s) for s in range(1, 5)), (5, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(_messages(caplog, "unsent at close")) == 1  # the second sent everything


def test_history_fills_a_hole_in_the_middle_once(run_dir: Path) -> None:
    # e.g. points dropped from a full buffer during a long outage: the store has 1, 2, 4
    first = _tracker(run_dir)
    for step in (1, 2, 4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close(status="KILLED")
    rows = [{"step": s, "loss": 10.0 + s} for s in range(1, 6)]
    rows.append({"step": 5, "loss": -1.0})  # a step recorded twice (a rollback): first kept
    second = _tracker(run_dir, run_id=first.run_id, close_timeout_s=120)
    second.log_history(rows)
    second.log_metrics({"loss": 16.0}, step=6)
    second.close()
    expected = [(1, 1.0), (2, 2.0), (3, 13.0), (4, 4.0), (5, 15.0), (6, 16.0)]
    assert _history(_client(run_dir), first.run_id, "loss") == expected


# ---------------------------------------------------------------------- the local store


def _tables(db: Path) -> set[str]:
    with closing(sqlite3.connect(db)) as conn:
        return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _roll_back_schema(db: Path) -> None:
    """Set the schema one revision behind MLflow's newest: what a start killed during the last
    migration leaves, and MLflow's "Detected out-of-date database schema" ever after."""
    import mlflow.store
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.store.__file__).parent / "db_migrations"))
    previous = scripts.get_revision(scripts.get_current_head()).down_revision
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (previous,))


def test_store_is_created_whole_before_the_tracker_returns(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = run_dir / f"mlflow.db.creating-{gone.pid}-0"  # a start killed while creating
    killed.write_bytes(b"half")
    running = run_dir / f"mlflow.db.creating-{os.getpid()}-0"  # one still being made
    running.write_bytes(b"half")
    tracker = _tracker(run_dir)
    tables = _tables(run_dir / "mlflow.db")  # before the tracking thread was waited for
    tracker.close()
    assert {"alembic_version", "experiments", "runs", "metrics"} <= tables
    assert list(run_dir.glob("mlflow.db.creating-*")) == [running]


@pytest.mark.parametrize("damage", ["empty", "not_a_database", "schema_behind"])
def test_half_initialised_store_is_moved_aside_and_recreated(
    run_dir: Path, caplog, damage: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    db = run_dir / "mlflow.db"
    if damage == "empty":
        db.write_bytes(b"")
    elif damage == "not_a_database":
        db.write_bytes(b"SQLite format 3\x00" + b"\x07" * 100)
    else:
        _roll_back_schema(db)
    tracker = _tracker(run_dir)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.close()
    assert _history(_client(run_dir), tracker.run_id, "loss") == [(1, 1.0)]
    moved = _messages(caplog, "moved to")
    assert len(moved) == 1 and str(db) in moved[0] and "holds no run" in moved[0]
    assert len(list(run_dir.glob("mlflow.db.broken-*"))) == 1  # kept, not deleted


def test_store_that_holds_runs_is_never_moved(run_dir: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    db = run_dir / "mlflow.db"
    with closing(sqlite3.connect(db)) as conn, conn:  # a run, without opening it through MLflow
        conn.execute(
            "INSERT INTO runs (run_uuid, experiment_id, lifecycle_stage, status, start_time)"
            " VALUES ('r0', 0, 'active', 'FINISHED', 0)"
        )
    _roll_back_schema(db)
    tracker = _tracker(run_dir, close_timeout_s=1.0)
    tracker.close()
    problems = _messages(caplog, "could not be prepared")
    assert len(problems) == 1 and str(db) in problems[0] and "out-of-date" in problems[0]
    assert not list(run_dir.glob("mlflow.db.broken-*"))
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT run_uuid FROM runs").fetchall() == [("r0",)]


def test_artifacts_follow_a_moved_run_dir(run_dir: Path, tmp_path: Path) -> None:
    import mlflow.tracking._tracking_service.utils as tracking_utils

    (run_dir / "config.yaml").write_text("a: 1\n")
    first = _tracker(run_dir)
    first.log_artifact(run_dir / "config.yaml")
    first.close()
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run_dir, moved)
    tracking_utils._artifact_repos_cache.pop(first.run_id, None)  # a resume is a new process

    second = _tracker(moved, run_id=first.run_id)
    (moved / "plots").mkdir()
    (moved / "plots" / "training.png").write_bytes(b"png")
    second.log_artifact(moved / "plots" / "training.png", "plots")
    second.close()

    client = _client(moved)
    run = client.get_run(first.run_id)
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    assert run.data.tags["run_dir"] == str(moved)
    assert {a.path for a in client.list_artifacts(first.run_id)} == {"config.yaml", "plots"}
    assert next((moved / "mlartifacts").rglob("training.png")).read_bytes() == b"png"
    assert not run_dir.exists()  # nothing recreated at the old place
