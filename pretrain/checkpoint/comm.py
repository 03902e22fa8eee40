"""The few collectives the checkpoint manager needs, as no-ops for a single process.

All of them run on one gloo group owned by the manager, so checkpoint traffic never interleaves
with training collectives (and DCP's async writer, which needs a CPU backend, gets one even when
training runs on NCCL).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from pretrain.checkpoint.errors import CheckpointError

T = TypeVar("T")


class CheckpointCollectiveError(CheckpointError):
    """A step that one rank ran on behalf of all (rank 0's rename, a scan) failed there."""


class CheckpointComm:
    """Rank, world size and object collectives over the checkpoint group (or none).

    Args:
        process_group: the training process group, or None for a single process. Creating the
            manager's own gloo group is collective over the default group: every rank must build
            its ``CheckpointComm`` at the same point.
        timeout_s: how long a checkpoint collective may wait before failing (None: torch default).
    """

    def __init__(self, process_group: Any = None, timeout_s: float | None = None) -> None:
        self.group = None
        self.rank, self.world = 0, 1
        if process_group is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError(
                    "torch.distributed is initialised with several ranks but no process_group was"
                    " given: every rank would write the same files; pass the process group"
                )
            return
        ranks = dist.get_process_group_ranks(process_group)
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        self.group = dist.new_group(ranks=ranks, backend="gloo", timeout=timeout)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, indexed by rank in the checkpoint group."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        An exception on rank 0 is re-raised there and raised as ``CheckpointCollectiveError`` on
        the other ranks, so no rank is left waiting in a later collective.
        """
        result: Any = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # every rank must learn about it, then it is re-raised
                error = exc
        status = self.broadcast((result, None if error is None else repr(error)))
        if error is not None:
            raise error
        if status[1] is not None:
            raise CheckpointCollectiveError(f"rank 0 failed: {status[1]}")
        return status[0]

    def agree(self, problem: str | None) -> str | None:
        """Combine each rank's problem (None = fine) so that all ranks take the same branch."""
        problems = [p for p in self.all_gather(problem) if p is not None]
        return "; ".join(dict.fromkeys(problems)) if problems else None
