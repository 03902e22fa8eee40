"""``exit_status.json`` in the run directory: how the last start of a run ended, for requeue
scripts. Exit codes cannot say it: torchrun's agent exits 1 when it is itself sent SIGTERM even
after every rank saved and returned 0, and a SIGKILL leaves no code of ours at all.

    running    the run is going, or died without a word (SIGKILL, OOM kill, node loss): crashed
    preempted  a stop signal was honoured: every rank saved ``checkpoint_step``; requeue it
    finished   train.steps reached and saved; nothing to do
    failed     an error ended it (``error`` says which); requeueing repeats it unless it was a
               lost peer or a timeout (``retryable``)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint.files import TMP_PREFIX, atomic_write

logger = logging.getLogger("pretrain")

EXIT_STATUS = "exit_status.json"


def write_exit_status(run_dir: Path, status: str, step: int | None, **details: Any) -> None:
    """Record ``status`` at ``step`` (None: before the trainer knows it) atomically (a reader
    sees the old record or the new)."""
    record = {
        "status": status,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **details,
    }
    data = (json.dumps(record, indent=1) + "\n").encode()
    path = run_dir / EXIT_STATUS
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as err:  # a full disk: no room for a temporary file
        for leftover in run_dir.glob(f"{TMP_PREFIX}{EXIT_STATUS}.*"):
            leftover.unlink(missing_ok=True)
        if not _overwrite_in_place(path, data):
            # the error that got us here matters more: log, do not raise over it
            logger.warning("could not record exit status %r in %s: %s", status, run_dir, err)


def _overwrite_in_place(path: Path, data: bytes) -> bool:
    """Rewrite an existing record in its own (already allocated) block: on a full disk a
    ``running`` record can still become ``failed``. Not atomic, so only the fallback."""
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False


def read_exit_status(run_dir: Path) -> dict[str, Any] | None:
    """The last record, or None when the run never started here."""
    path = Path(run_dir) / EXIT_STATUS
    return json.loads(path.read_text()) if path.exists() else None
