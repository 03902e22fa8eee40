"""The bounded, thread-safe buffer between the training thread and the tracking thread.

The training thread only appends (a lock and a deque append per metric); the tracking thread
takes batches out. When the store is down for long, the oldest metrics are dropped first and
counted, so memory stays bounded and the newest curve survives.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import NamedTuple


class MetricPoint(NamedTuple):
    """One scalar at one step, stamped when the trainer logged it."""

    key: str
    value: float
    timestamp_ms: int
    step: int


class ArtifactItem(NamedTuple):
    """A local file or directory to upload, and the folder inside the run's artifacts."""

    path: Path
    artifact_path: str | None


class TrackingBuffer:
    """Metrics, params and artifacts waiting for the tracking thread.

    Args:
        max_metrics: the most metric points held; beyond it the oldest are dropped.
        max_artifacts: the most artifact uploads held; beyond it the oldest are dropped.
    """

    def __init__(self, max_metrics: int, max_artifacts: int = 1000) -> None:
        if max_metrics < 1 or max_artifacts < 1:
            raise ValueError("buffer bounds must be >= 1")
        self._lock = threading.Lock()
        self._metrics: deque[MetricPoint] = deque()
        self._params: dict[str, str] = {}
        self._artifacts: deque[ArtifactItem] = deque()
        self.max_metrics = max_metrics
        self.max_artifacts = max_artifacts
        self.dropped_metrics = 0
        self.dropped_artifacts = 0

    def add_metrics(self, points: list[MetricPoint]) -> int:
        """Append metric points, dropping the oldest beyond the bound.

        Returns:
            How many points this call dropped.
        """
        with self._lock:
            self._metrics.extend(points)
            dropped = max(0, len(self._metrics) - self.max_metrics)
            for _ in range(dropped):
                self._metrics.popleft()
            self.dropped_metrics += dropped
        return dropped

    def add_params(self, params: dict[str, str]) -> None:
        """Merge params; a later value for the same key replaces an unsent earlier one."""
        with self._lock:
            self._params.update(params)

    def restore_params(self, params: dict[str, str]) -> None:
        """Put back params whose send failed; values queued since then stay newer."""
        with self._lock:
            self._params = {**params, **self._params}

    def add_artifact(self, item: ArtifactItem) -> int:
        """Append an upload, dropping the oldest beyond the bound; returns how many dropped."""
        with self._lock:
            self._artifacts.append(item)
            if len(self._artifacts) <= self.max_artifacts:
                return 0
            self._artifacts.popleft()
            self.dropped_artifacts += 1
            return 1

    def take_metrics(self, limit: int) -> list[MetricPoint]:
        """Remove and return up to ``limit`` of the oldest metric points."""
        with self._lock:
            n = min(limit, len(self._metrics))
            return [self._metrics.popleft() for _ in range(n)]

    def take_params(self) -> dict[str, str]:
        """Remove and return every pending param."""
        with self._lock:
            params, self._params = self._params, {}
            return params

    def take_artifact(self) -> ArtifactItem | None:
        """Remove and return the oldest pending upload, if any."""
        with self._lock:
            return self._artifacts.popleft() if self._artifacts else None

    def counts(self) -> tuple[int, int, int]:
        """Pending ``(metric points, params, artifacts)``."""
        with self._lock:
            return len(self._metrics), len(self._params), len(self._artifacts)

    def __len__(self) -> int:
        with self._lock:
            return len(self._metrics)
