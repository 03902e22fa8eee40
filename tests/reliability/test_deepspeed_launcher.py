"""SIGTERM to ``launch.deepspeed_run`` reaches the DeepSpeed workers: they checkpoint and exit 0.

(The plain ``deepspeed`` runner dies at once on SIGTERM and its workers train on to the end;
see the module docstring of ``launch/deepspeed_run.py``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.deepspeed_run import local_workers
from pretrain.checkpoint import files
from tests.pretrain.trainer_helpers import FAST, TINY, free_port, logged_rows

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "pretrain" / "train_worker.py"
STEPS = 100_000  # never reached: only the signal ends this run


def _wait_for(condition, deadline_s: float, what: str) -> None:  # noqa: ANN001
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.5)


def _kill(proc: subprocess.Popen, workers: list) -> None:
    """After a failure: the wrapper, everything under it, and the workers seen (which would
    train on if the launcher died without them)."""
    import psutil

    leftovers = list(workers)
    if proc.poll() is None:
        leftovers += psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait()
    for child in leftovers:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _steps(run_dir: Path) -> list[int]:
    try:
        return [row["step"] for row in logged_rows(run_dir) if "loss" in row]
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half-written
        return []


def test_sigterm_to_the_wrapper_checkpoints_every_rank_and_exits_0(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launch.deepspeed_run",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--no_local_rank",
        str(WORKER),
        TINY,
        "0",
        *FAST,
        f"train.steps={STEPS}",
        "train.batch_size=2",
        f"run.dir={run_dir}",
        "parallel.backend=deepspeed",
        "parallel.deepspeed_config=configs/deepspeed/zero2.json",
        "parallel.timeout_s=120",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "output.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    workers = []
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2 or proc.poll() is not None, 180, "2 steps")
        assert proc.poll() is None, log.read_text()[-4000:]
        workers = local_workers(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        alive = [w.pid for w in workers if w.is_running() and w.status() != "zombie"]
        assert not alive, f"workers {alive} outlived the launcher"
    finally:
        _kill(proc, workers)
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "forwarded SIGTERM to 2 DeepSpeed worker(s)" in output
    last = _steps(run_dir)[-1]
    assert last < STEPS
    root = run_dir / "checkpoints"
    assert files.read_latest(root) == files.step_dir_name(last)
    manifest = files.read_manifest(root / files.step_dir_name(last))
    assert manifest["engine"] == files.ENGINE_DEEPSPEED and manifest["world_size"] == 2
