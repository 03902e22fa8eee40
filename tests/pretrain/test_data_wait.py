"""The trainer's data wait: the time each step waits for its batches (``data/wait_s``) and its
share of the step (``data/wait_share``) reach the metrics, the tracker and the console line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pretrain.trainer_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

GRAD_ACCUM = 2
BLOCK_S = 0.02  # how long the slow reader blocks before each micro-batch


class BlockingBatches:
    """The reader's batches, each handed out after blocking on an Event that nobody sets, so
    every wait runs its whole timeout; the wrapper times each of its own blocks."""

    def __init__(self, batches: Iterator[dict[str, Any]], blocks_s: list[float]) -> None:
        self._batches = batches
        self._never_set = threading.Event()
        self.blocks_s = blocks_s

    def __iter__(self) -> BlockingBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._never_set.wait(BLOCK_S)
        batch = next(self._batches)
        self.blocks_s.append(time.perf_counter() - t0)
        return batch


class RecordingTracker:
    """Keeps what the trainer logs (the ``Tracker`` protocol, no store)."""

    run_id = None

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_history(self, rows: list[dict[str, float]]) -> None:
        pass

    def wait_for_run(self, timeout_s: float) -> str | None:
        return None

    def close(self, status: str = "FINISHED") -> None:
        pass


@dataclass
class SlowRun:
    trainer: Any  # pretrain.trainer.Trainer
    rows: list[dict[str, float]]  # the training rows, one per step
    tracker: RecordingTracker
    lines: list[str]  # the console lines
    blocks_s: list[float]  # each micro-batch's block, timed by the reader wrapper


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory: pytest.TempPathFactory) -> SlowRun:
    """A short training whose reader blocks before every micro-batch (two per step)."""
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config

    run_dir = tmp_path_factory.mktemp("data_wait")
    overrides = [*FAST, "train.steps=4", f"train.grad_accum={GRAD_ACCUM}", "checkpoint.every=0"]
    cfg = load_config(TINY, [*overrides, f"run.dir={run_dir}"])
    tracker = RecordingTracker()
    lines: list[str] = []
    trainer = build_trainer(cfg, DistInfo(), tracker_factory=lambda *a: tracker, log=lines.append)
    blocks_s: list[float] = []
    open_stage_data = trainer._open_stage_data

    def open_slow_stage_data(stage, state=None) -> None:  # noqa: ANN001
        open_stage_data(stage, state)
        trainer.batches = BlockingBatches(trainer.batches, blocks_s)

    trainer._open_stage_data = open_slow_stage_data
    rows = [row for row in trainer.run() if "loss" in row]
    return SlowRun(trainer, rows, tracker, lines, blocks_s)


def test_data_wait_is_logged_every_step_as_seconds_and_share(slow_run: SlowRun) -> None:
    rows = slow_run.rows
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 0.0 <= row["data/wait_s"] <= row["step_time_s"]
        assert 0.0 <= row["data/wait_share"] <= 1.0
        assert row["data/wait_share"] == row["data/wait_s"] / row["step_time_s"]
        # the tracker (MLflow) gets the same values at the same step
        sent = slow_run.tracker.metrics[row["step"]]
        assert sent["data/wait_s"] == row["data/wait_s"]
        assert sent["data/wait_share"] == row["data/wait_share"]


def test_data_wait_covers_the_time_the_reader_blocked(slow_run: SlowRun) -> None:
    rows, blocks = slow_run.rows, slow_run.blocks_s
    assert len(blocks) == GRAD_ACCUM * len(rows)  # every micro-batch came through the wrapper
    for row in rows:
        step = row["step"]
        blocked = sum(blocks[GRAD_ACCUM * (step - 1) : GRAD_ACCUM * step])
        assert row["data/wait_s"] >= blocked, (step, row["data/wait_s"], blocked)


def test_console_line_shows_the_data_wait_from_the_threshold_on(slow_run: SlowRun) -> None:
    from pretrain.trainer import DATA_WAIT_SHOWN

    # the run's own lines: the share is named exactly when it reaches the threshold
    step_lines = [line for line in slow_run.lines if line.startswith("step ")]
    assert len(step_lines) == len(slow_run.rows)
    for line, row in zip(step_lines, slow_run.rows, strict=True):
        share = row["data/wait_share"]
        shown = f" | data wait {share:.0%}"
        assert (shown in line) == (share >= DATA_WAIT_SHOWN), (line, share)

    # and both sides of the threshold, whatever this machine's timings were
    trainer, lines = slow_run.trainer, slow_run.lines
    metrics = {k: v for k, v in slow_run.rows[-1].items() if k != "step"}
    for share, expected in [(0.35, " | data wait 35%"), (DATA_WAIT_SHOWN / 2, None)]:
        del lines[:]
        trainer._log({**metrics, "data/wait_share": share})
        (line,) = lines
        if expected is None:
            assert "data wait" not in line
        else:
            assert line.endswith(expected)
