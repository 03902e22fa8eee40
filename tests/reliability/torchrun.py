"""Run the test worker (tests/pretrain/train_worker.py) as 2 gloo ranks under torchrun, with a
fault injected into one rank (``HYDRA_TEST_FAULT=RANK:STEP:SIGNAL``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.pretrain.trainer_helpers import FAST, TINY, WORKER, free_port

# 8 steps of 2 rows per rank, a checkpoint every 2 steps, DDP
STEPS = ("train.steps=8", "checkpoint.every=2", "train.batch_size=2", "parallel.backend=ddp")


def torchrun(
    run_dir: Path,
    *overrides: str,
    rendezvous: str = "static",
    fault: str | None = None,
    max_restarts: int = 1,
) -> subprocess.CompletedProcess:
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
        f"--max-restarts={max_restarts}",
        *rdzv,
        str(WORKER),
        TINY,
        "0",
        *FAST,
        *STEPS,
        f"run.dir={run_dir}",
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HYDRA_TEST_FAULT", None)
    if fault:
        env["HYDRA_TEST_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)  # hang guard


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
