"""Elastic restart: a rank killed with SIGKILL under ``torchrun --max-restarts`` comes back.

The restarted ranks must form a fresh process group (they once read the dead attempt's gloo
addresses from torchrun's store and failed with "Connection refused"), resume from the latest
checkpoint and finish with the losses of an uninterrupted run: one row per step in
``metrics.jsonl``, at most one checkpoint interval redone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain.trainer_helpers import FAST, TINY, WORKER, free_port, logged_rows, losses

STEPS = ("train.steps=8", "checkpoint.every=2", "train.batch_size=2", "parallel.backend=ddp")


def torchrun(
    run_dir: Path, rendezvous: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    """2 gloo ranks of the FAST tiny config under torchrun with one restart allowed."""
    port = free_port()
    if rendezvous == "c10d":
        rdzv = ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=drill"]
    else:
        rdzv = ["--master_addr=127.0.0.1", f"--master_port={port}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        *rdzv,
        str(WORKER),
        TINY,
        "0",
        *FAST,
        *STEPS,
        f"run.dir={run_dir}",
        "parallel.timeout_s=60",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_TEST_FAULT", None)
    if fault:
        env["HYDRA_TEST_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _check(torchrun(run_dir, "static"))
    return run_dir


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_killed_rank_restarts_and_matches_uninterrupted_run(
    uninterrupted: Path, tmp_path: Path, rendezvous: str
) -> None:
    proc = torchrun(tmp_path, rendezvous, fault="1:5:KILL")  # after step 5; checkpoint at 4
    _check(proc)
    out = proc.stdout + proc.stderr
    assert "resumed from step 4" in out, out[-3000:]
    steps = [row["step"] for row in logged_rows(tmp_path) if "loss" in row]
    assert steps == list(range(1, 9))  # each step once: rows past the checkpoint were dropped
    assert losses(tmp_path) == losses(uninterrupted)  # resume within one layout is exact
