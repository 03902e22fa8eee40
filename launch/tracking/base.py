"""The interface the trainer logs through, and the tracker that logs nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """Experiment tracking as the trainer sees it. No method may block or raise on store errors.

    ``run_id`` is the tracking run to store in checkpoints (``None`` until one exists).
    """

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log a (nested) config as params with flattened dotted keys."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at a training step."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or directory as an artifact of the run (under ``artifact_path``)."""

    def log_history(self, rows: Sequence[dict[str, float]]) -> None:
        """Bring the run up to date with recorded rows (``metrics.jsonl`` up to the checkpoint a
        resume starts from, each with its ``step``): send the points it lacks, none twice."""

    def wait_for_run(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for the run id (created in the background); None if not yet."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is buffered (bounded in time) and end the run with ``status``."""


class NullTracker:
    """Logs nothing and touches no file: tracking disabled, or a rank other than 0.

    Args:
        run_id: kept as is, so a checkpoint written while tracking is off still carries the run
            a later, tracked resume should continue.
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Ignore params."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Ignore metrics."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Ignore artifacts."""

    def log_history(self, rows: Sequence[dict[str, float]]) -> None:
        """Ignore the history."""

    def wait_for_run(self, timeout_s: float) -> str | None:
        """Return ``run_id`` at once: there is nothing to wait for."""
        return self.run_id

    def close(self, status: str = "FINISHED") -> None:
        """Nothing to flush."""
