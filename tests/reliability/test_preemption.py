"""SIGTERM at any moment: a consistent checkpoint on every rank, or a clean exit before the
first step with nothing half-written; ``exit_status.json`` tells a requeue script which."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pretrain.exit_status import read_exit_status
from tests.pretrain.trainer_helpers import FAST, TINY, logged_rows
from tests.reliability.torchrun import check_ok, torchrun


def test_one_rank_signalled_every_rank_saves_the_same_step(tmp_path: Path) -> None:
    check_ok(torchrun(tmp_path, fault="1:3:TERM", max_restarts=0))  # only rank 1 is told
    status = read_exit_status(tmp_path)
    assert status["status"] == "preempted" and status["signal"] is None, status  # rank 0's view
    assert status["step"] == status["checkpoint_step"] == 3, status
    assert (tmp_path / "checkpoints" / "step_00000003" / "manifest.json").is_file()
    assert [row["step"] for row in logged_rows(tmp_path) if "loss" in row] == [1, 2, 3]


def _handles_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler yet (bit 15 of SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_signal_during_start_up_exits_cleanly(tmp_path: Path) -> None:
    """The handler is the entry point's first act, before torch, the model or any file."""
    cmd = [sys.executable, "-m", "launch.train", "--config", TINY, *FAST, f"run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not _handles_sigterm(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "never installed a handler"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    status = read_exit_status(tmp_path)
    assert status["status"] == "preempted" and status["step"] == 0, status
    assert status["checkpoint_step"] is None
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
