"""Logging for the entry points: configured once per process, rank 0 only unless asked.

Two streams, as before logging replaced ``print``:

- stdout: the trainer's progress lines (``pretrain.console``: ``step ...``, ``checkpoint saved
  at step N``, ``resumed from step N ...``), bare, so they read as they always did;
- stderr: every other record, ``time logger: message``.

With several ranks (``WORLD_SIZE`` > 1), rank 0 logs from INFO up and the other ranks only their
warnings and errors, marked ``[rank N]``. ``--log-all-ranks`` (or ``HYDRA_LOG_ALL_RANKS=1``)
shows every rank's records, each marked with its rank.
"""

from __future__ import annotations

import logging
import os
import sys

from parallel.dist import launcher_rank, launcher_world_size

CONSOLE_LOGGER = "pretrain.console"  # pretrain.trainer.console: the trainer's progress lines
ALL_RANKS_ENV = "HYDRA_LOG_ALL_RANKS"
RECORD_FORMAT = "%(asctime)s %(name)s: %(message)s"


class RankFilter(logging.Filter):
    """Pass every record on rank 0 (or on every rank when ``all_ranks``); elsewhere only
    warnings and errors, which must never be lost to the filter."""

    def __init__(self, rank: int, all_ranks: bool) -> None:
        super().__init__()
        self.rank = rank
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


class _CurrentStream(logging.StreamHandler):
    """Writes to ``sys.stdout``/``sys.stderr`` as they are at each record, not as they were at
    configuration (pytest's capture and a redirected stream then see the lines)."""

    def __init__(self, name: str) -> None:
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):  # noqa: ANN201 - a text stream
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns its default
        pass


def log_all_ranks_from_env() -> bool:
    """Whether ``HYDRA_LOG_ALL_RANKS`` asks for every rank's records (``1``/``true``/``yes``)."""
    return os.environ.get(ALL_RANKS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configure_logging(all_ranks: bool = False, level: int = logging.INFO) -> None:
    """Route this process's records to stdout/stderr with the rank filter; safe to call again
    (the handlers of an earlier call are replaced, others' are kept).

    Args:
        all_ranks: show every rank's records (also when ``HYDRA_LOG_ALL_RANKS=1``); rank and
            world size come from the launcher's ``RANK``/``WORLD_SIZE``.
        level: the lowest level shown.
    """
    rank, world = launcher_rank(), launcher_world_size()
    all_ranks = all_ranks or log_all_ranks_from_env()
    marked = world > 1 and (all_ranks or rank != 0)
    prefix = f"[rank {rank}] " if marked else ""
    rank_filter = RankFilter(rank, all_ranks)

    console = _CurrentStream("stdout")
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    records = _CurrentStream("stderr")
    records.setFormatter(logging.Formatter(prefix + RECORD_FORMAT))
    for handler, logger in ((console, CONSOLE_LOGGER), (records, None)):
        handler.addFilter(rank_filter)
        handler.set_name("hydra-pretrain")  # ours: replaced by the next call
        target = logging.getLogger(logger)
        for old in [h for h in target.handlers if h.get_name() == "hydra-pretrain"]:
            target.removeHandler(old)
        target.addHandler(handler)
        target.setLevel(level)
    # the console lines have their own stream; not again on stderr
    logging.getLogger(CONSOLE_LOGGER).propagate = False
