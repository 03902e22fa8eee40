"""Elastic restart: a rank killed with SIGKILL under ``torchrun --max-restarts`` comes back.

The restarted ranks must form a fresh process group (they once read the dead attempt's gloo
addresses from torchrun's store and failed with "Connection refused"), resume from the latest
checkpoint and finish with the losses of an uninterrupted run: one row per step in
``metrics.jsonl``, at most one checkpoint interval redone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.exit_status import read_exit_status
from tests.pretrain.trainer_helpers import logged_rows, losses
from tests.reliability.torchrun import check_ok, torchrun


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    check_ok(torchrun(run_dir))
    return run_dir


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_killed_rank_restarts_and_matches_uninterrupted_run(
    uninterrupted: Path, tmp_path: Path, rendezvous: str
) -> None:
    proc = torchrun(tmp_path, rendezvous=rendezvous, fault="1:5:KILL")  # checkpoint at 4
    check_ok(proc)
    out = proc.stdout + proc.stderr
    assert "resumed from step 4" in out, out[-3000:]
    steps = [row["step"] for row in logged_rows(tmp_path) if "loss" in row]
    assert steps == list(range(1, 9))  # each step once: rows past the checkpoint were dropped
    assert losses(tmp_path) == losses(uninterrupted)  # resume within one layout is exact
    assert read_exit_status(tmp_path)["status"] == "finished"
