"""Train with MLflow tracking and die by SIGKILL with metric points still buffered:

    python tests/reliability/kill_worker.py HOLD_FROM KILL_AT CONFIG [overrides...]

Every MLflow batch that holds a step >= HOLD_FROM waits forever (a slow store), so those points
never leave the buffer; once step KILL_AT is recorded in ``metrics.jsonl`` the process kills
itself. What reaches the store is therefore known: only points of steps < HOLD_FROM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.tracking.session import MlflowSession  # noqa: E402
from parallel.dist import run_and_exit  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402
from tests.pretrain.train_worker import main  # noqa: E402


def hold_sends_from(step: int) -> None:
    send = MlflowSession.send_metrics

    def held(self: MlflowSession, points: list) -> None:
        if any(p.step >= step for p in points):
            threading.Event().wait()  # until the kill
        send(self, points)

    MlflowSession.send_metrics = held


def kill_after(step: int) -> None:
    log = Trainer._log

    def logged(self: Trainer, metrics: dict[str, float]) -> None:
        log(self, metrics)
        if self.state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer._log = logged


if __name__ == "__main__":
    hold_from, kill_at, config, *overrides = sys.argv[1:]
    hold_sends_from(int(hold_from))
    kill_after(int(kill_at))
    run_and_exit(lambda: main([config, "0", *overrides]))
