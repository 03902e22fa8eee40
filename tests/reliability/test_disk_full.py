"""A full disk: the save fails with an error that says so, ``exit_status.json`` says failed (it
is rewritten in its own block when no temporary file fits), and no incomplete checkpoint is
ever published. Needs the right to mount a small tmpfs (root in a container); skipped without."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pretrain.checkpoint.files import step_dirs
from pretrain.exit_status import read_exit_status
from tests.pretrain.trainer_helpers import FAST, TINY


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_clearly_and_publishes_nothing_incomplete(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        TINY,
        *FAST,
        "train.steps=12",
        "train.batch_size=2",
        "checkpoint.every=2",
        f"run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "No space left on device?" in proc.stderr, proc.stderr[-3000:]
    status = read_exit_status(run_dir)
    assert status["status"] == "failed" and "No space left on device?" in status["error"], status
    for ckpt in step_dirs(run_dir / "checkpoints"):  # whatever was published is complete
        assert (ckpt / "manifest.json").is_file(), ckpt
