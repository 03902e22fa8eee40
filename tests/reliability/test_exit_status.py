"""``exit_status.json`` for a start that dies before its trainer runs: an older ``preempted``
left in place would make a requeue script requeue a run that cannot start, forever."""

from __future__ import annotations

from pathlib import Path

import pytest

import pretrain.build
from pretrain.config import load_config
from pretrain.exit_status import read_exit_status, write_exit_status
from tests.pretrain.trainer_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_start_that_fails_before_training_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(TINY, [*FAST, f"run.dir={tmp_path}"])
    write_exit_status(tmp_path, "preempted", step=4, checkpoint_step=4)  # the previous start

    def broken_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("Gloo connectFullMesh failed: Connection refused")

    monkeypatch.setattr(pretrain.build, "build_trainer", broken_build)
    with pytest.raises(RuntimeError, match="connectFullMesh"):
        pretrain.build.run_training(cfg)
    status = read_exit_status(tmp_path)
    assert status["status"] == "failed" and status["retryable"] is True, status
    assert "connectFullMesh" in status["error"]
