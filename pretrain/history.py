"""The run's metrics history, ``metrics.jsonl``: one JSON object per logged row, with its ``step``.

Rank 0 appends a row per training step (and per evaluation); it is the record that survives the
process, and the source from which MLflow is brought up to date on resume. A hard kill can leave
a torn last line: reading drops it with a warning instead of failing. Rewriting (on every start)
goes through a temporary file and ``os.replace``, so a kill during it leaves the old file whole.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _parse(line: str) -> dict[str, float] | None:
    """A row, or None when the line is not a JSON object with a numeric ``step``."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    if isinstance(step, bool) or not isinstance(step, int | float):
        return None
    return row


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl`` file (empty when it does not exist).

    A line that does not parse is dropped with a warning naming the file and line: at the end it
    is what a kill during an append leaves; in the middle only damage or an edit can put it there,
    and one lost row is better than a run that can no longer resume or plot (the next rewrite
    drops it for good).
    """
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is not None:
            rows.append(row)
            continue
        where = "partial last line" if number == len(lines) else "corrupt line"
        logger.warning("%s: dropped a %s (line %d: %.80r)", path, where, number, line)
    return rows


def append_metrics(path: Path, row: dict[str, float]) -> None:
    """Append one row (floats are written exactly: ``repr`` round-trips)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def rewrite_metrics(path: Path, rows: Iterable[dict[str, float]]) -> None:
    """Replace the file by ``rows`` atomically: a kill at any moment leaves the old or new file."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
