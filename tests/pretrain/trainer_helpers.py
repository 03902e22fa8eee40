"""Run short trainings for the trainer tests: in this process, or as 2 gloo ranks under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.pretrain.model_helpers import CONFIG_DIR

WORKER = Path(__file__).with_name("train_worker.py")
TINY = str(CONFIG_DIR / "hydra-tiny.yaml")
ATTAMBA_TINY = str(CONFIG_DIR / "attamba-tiny.yaml")
DREAMER_TINY = str(CONFIG_DIR / "dreamer-tiny.yaml")
# FAST's model.n_layers=2 does not fit Dreamer (prelude + shared layer + coda): put it back
DREAMER_FAST = ("model.n_layers=3",)
# A fast variant of the tiny config: 2 blocks with every component, short rows, 6 steps.
FAST = [
    "model.n_layers=2",
    "model.workspace.after_blocks=[1]",
    "model.pkm.after_blocks=[0]",
    "train.steps=6",
    "train.batch_size=4",
    "train.seq_len=64",
    "train.warmup_steps=2",
    "train.log_every=1",
    "tracking.enabled=false",
    "run.plot=false",
    "curriculum.stages=[]",
    "checkpoint.every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(
    run_dir: Path,
    *overrides: str,
    stop_at: int = 0,
    nproc: int = 1,
    env: dict | None = None,
    config: str = TINY,
    worker: Path = WORKER,
) -> subprocess.CompletedProcess:
    """Train ``config`` (FAST) in a subprocess (``nproc`` > 1: torchrun with gloo); raises with
    its output on failure. ``worker``: a script taking ``train_worker.py``'s arguments."""
    args = [config, str(stop_at), *FAST, f"run.dir={run_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(worker), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(worker),
            *args,
        ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    # a hang guard, not a speed check: a loaded 2-core machine ran a 100 s compile test past 300 s
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(
            f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def logged_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in logged_rows(run_dir) if "loss" in row]
