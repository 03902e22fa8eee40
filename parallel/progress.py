"""Where each rank is, so that a hung or failed collective can say who stopped and where.

A gloo timeout says only "Timed out waiting 30000ms for recv operation to complete". Each rank
posts its step and phase to the process group's store as it enters the phase (one small write;
the store is torchrun's or rank 0's). When a collective fails, the rank that noticed reads every
rank's last post and names the ranks that are behind: the one that stopped answering, or died.
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import Any

import torch.distributed as dist

logger = logging.getLogger("parallel")

_KEY = "progress/rank{}"
# gloo: "Timed out waiting ...", "Connection closed by peer", "Connection reset by peer";
# NCCL's watchdog: "... collective operation timeout"; a peer gone mid-handshake: connectFullMesh
_PEER_FAILURE = re.compile(
    r"timed out|timeout|connection (closed|reset|refused)|connectfullmesh|broken pipe", re.I
)
_READ_TIMEOUT = datetime.timedelta(seconds=5)


class CollectiveFailure(RuntimeError):
    """A collective timed out or lost a peer; the message names this rank, the phase and step,
    and the ranks that were behind."""


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective that timed out or lost its peer (not a bug of ours): a
    ``DistError`` (NCCL, the store), or a gloo error of that kind (gloo raises RuntimeError; a
    data loader's own "timed out" is not one)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return (
        isinstance(err, RuntimeError)
        and "gloo" in text.lower()
        and bool(_PEER_FAILURE.search(text))
    )


class ProgressBoard:
    """This rank's (step, phase) in the store; a no-op without a process group."""

    def __init__(self, rank: int = 0, world_size: int = 1, timeout_s: float = 0.0) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.step, self.phase = 0, "start"
        self._store: Any = None
        if world_size > 1 and dist.is_initialized():
            self._store = dist.distributed_c10d._get_default_store()

    def enter(self, step: int, phase: str) -> None:
        """Record that this rank starts ``phase`` of step ``step`` (the step being computed)."""
        self.step, self.phase = step, phase
        if self._store is not None:
            try:
                self._store.set(_KEY.format(self.rank), f"{step}\t{phase}")
            except Exception:  # noqa: BLE001 - a store that is gone shows up in the collective
                logger.debug("progress: store unreachable", exc_info=True)

    def failure(self, err: BaseException) -> CollectiveFailure:
        """The error to raise for a failed collective: where this rank was, where the others."""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return CollectiveFailure(
            f"rank {self.rank}: a collective in '{self.phase}' at step {self.step} failed after"
            f" at most parallel.timeout_s={self.timeout_s:g} s ({first_line}). {self.describe()}"
        )

    def describe(self) -> str:
        """Every other rank's last posted (step, phase), the ranks behind this one first."""
        if self._store is None:
            return ""
        behind, level, silent = [], [], []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            post = self._read(rank)
            if post is None:
                silent.append(rank)
                continue
            step, phase = post
            where = f"rank {rank} at step {step} in '{phase}'"
            (behind if (step, phase) != (self.step, self.phase) else level).append(where)
        parts = []
        if behind:
            parts.append("Elsewhere (suspects, stopped or dead): " + "; ".join(behind) + ".")
        if silent:
            parts.append(f"No progress posted by ranks {silent}.")
        if level:
            parts.append(f"Waiting like this rank: {len(level)} ranks.")
        return " ".join(parts)

    def _read(self, rank: int) -> tuple[int, str] | None:
        key = _KEY.format(rank)
        try:
            self._store.set_timeout(_READ_TIMEOUT)  # a frozen rank 0 may host the store
            if not self._store.check([key]):
                return None
            step, phase = self._store.get(key).decode().split("\t", 1)
            return int(step), phase
        except Exception:  # noqa: BLE001 - the store itself may be gone with a dead rank 0
            return None
