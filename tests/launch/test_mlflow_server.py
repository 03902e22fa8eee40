"""Training against a real MLflow tracking server (``mlflow server`` on 127.0.0.1, a free port, a
temporary SQLite backend and artifacts proxied through the server): the run, its params, every
step of its metric history and its artifacts read back over REST; a run killed hard and resumed
continues the same run with each step once. The test starts the server and stops it by its PID
(its whole process group), leaving nothing running."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pretrain.trainer_helpers import free_port, logged_rows, run_training

try:
    importlib.metadata.version("mlflow")  # the full package: mlflow-skinny cannot run a server
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "the full mlflow package is not installed (pip install -e '.[dev]')",
        allow_module_level=True,
    )
from mlflow import MlflowClient  # noqa: E402

START_DEADLINE_S = 180.0  # a cold start on 2 busy cores takes 20-30 s
STOP_DEADLINE_S = 30.0
KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "data/wait_s", "data/wait_share")


class Server:
    """A running ``mlflow server``: its URI, PID (= its process group) and the paths it uses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
            "--serve-artifacts",  # clients upload through the server (mlflow-artifacts:/)
            f"--artifacts-destination={self.artifacts}",
            "--workers=1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # no background job runner: it starts seven huey consumers this test does not need
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        pytest.fail(f"mlflow server not answering after {START_DEADLINE_S:g} s:\n{self.tail()}")

    def stop(self) -> list[int]:
        """SIGTERM the process group (the CLI and its uvicorn worker), SIGKILL what is left at
        the deadline. Returns the PIDs that needed SIGKILL (none when it shut down cleanly)."""
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pass
        survivors = _wait_group_gone(pgid, STOP_DEADLINE_S)
        if survivors:
            _signal_group(pgid, signal.SIGKILL)
            self.proc.wait(timeout=STOP_DEADLINE_S)
            _wait_group_gone(pgid, STOP_DEADLINE_S)
        return survivors

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


def _wait_group_gone(pgid: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return members


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.wait_until_up()
        yield srv
    finally:
        survivors = srv.stop()
    assert not survivors, f"mlflow server processes {survivors} ignored SIGTERM:\n{srv.tail()}"
    assert not _group_members(srv.proc.pid), "mlflow server processes left running"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_training_against_a_live_server_and_resume_into_the_same_run(
    server: Server, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    tracked = (
        "tracking.enabled=true",
        f"tracking.uri={server.uri}",
        "tracking.experiment=live-server",
        "run.plot=true",
        "checkpoint.every=2",
    )
    # killed hard after step 5 (checkpoint at 4): what the tracker had buffered is lost
    with pytest.raises(AssertionError, match=r"training failed \(-9\)"):
        run_training(run_dir, *tracked, env={"HYDRA_TEST_FAULT": "0:5:KILL"})
    run_training(run_dir, *tracked)  # resumes at step 4, trains 5 and 6

    client = MlflowClient(tracking_uri=server.uri)
    experiment = client.get_experiment_by_name("live-server")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the resume continued the same run
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())

    params = run.data.params
    assert params["train.steps"] == "6" and params["model.n_layers"] == "2"
    assert params["tracking.uri"] == server.uri

    # every step exactly once, with the values the run recorded (metrics.jsonl)
    rows = {row["step"]: row for row in logged_rows(run_dir) if "loss" in row}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for key in KEYS:
        history = _history(client, run.info.run_id, key)
        assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6], key
        if key in ("loss", "lr"):  # deterministic on CPU: a replayed step logs the same value
            assert [v for _, v in history] == pytest.approx([rows[s][key] for s in rows], rel=1e-6)
    assert all(0.0 <= v <= 1.0 for _, v in _history(client, run.info.run_id, "data/wait_share"))

    # artifacts went through the server's proxy into its destination, and come back from it
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots"} <= listed
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/training.png"
    ]
    got = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert got.read_bytes() == (run_dir / "config.yaml").read_bytes()
    png = Path(client.download_artifacts(run.info.run_id, "plots/training.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(server.artifacts.rglob("plots/training.png")), "artifacts not in the server's store"
