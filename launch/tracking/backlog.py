"""The recorded history a resumed run hands over, waiting to be compared with the MLflow run.

The trainer passes the rows of ``metrics.jsonl`` up to its checkpoint; the tracking thread works
through them one metric key at a time (read the run's history of the key, send what it lacks),
and a key leaves the backlog only when all its missing points are sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence


class HistoryBacklog:
    """Rows (each a dict with ``step``) and, per metric key not yet done, how many points it has."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[dict[str, float]] = []
        self._pending: dict[str, int] = {}  # key -> points in the rows, in first-seen order

    def add(self, rows: Sequence[dict[str, float]]) -> None:
        """Queue rows; their keys (all but ``step``) join the keys to do."""
        counts = Counter(key for row in rows for key in row if key != "step")
        with self._lock:
            self._rows.extend(rows)
            for key, n in counts.items():
                self._pending[key] = self._pending.get(key, 0) + n

    def next_key(self) -> str | None:
        """The oldest key not done yet, or None (then the rows are released)."""
        with self._lock:
            if not self._pending:
                self._rows = []
                return None
            return next(iter(self._pending))

    def values(self, key: str) -> dict[int, float]:
        """``{step: value}`` of ``key``; a step recorded twice (a rollback) keeps its first value,
        as the live path does."""
        with self._lock:
            rows = self._rows
        values: dict[int, float] = {}
        for row in rows:
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.setdefault(int(row["step"]), float(value))
        return values

    def done(self, key: str) -> None:
        """Every missing point of ``key`` is in the store."""
        with self._lock:
            self._pending.pop(key, None)

    def __len__(self) -> int:
        """Points of the keys not done yet (some of them may already be in the store)."""
        with self._lock:
            return sum(self._pending.values())
