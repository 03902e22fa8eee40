"""The reader's account of corrupt samples skipped under ``on_corrupt=skip``: a cumulative count,
the shards involved, one warning per shard per process, and the ``max_skipped_fraction`` limit.

The fraction is ``skipped / max(read, floor)``: ``read`` counts the dataset samples this rank's
reader tried, ``floor`` is this rank's share of one epoch. Measured against at least an epoch, a
bad shard met in the first batches does not trip the limit by itself, while a shard that holds
more than the limit's share of the data trips it within the first epoch, wherever it falls.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.errors import TooManySkippedSamples

Skip = tuple[str, str, bool]  # (shard path, reason, whole shard unusable)
_SHOWN_SHARDS = 10  # shards named in the limit error, most skipped first

# (shard, whole) already reported by this process: readers are rebuilt per curriculum stage
# and per evaluation, and each DataLoader worker finds a bad shard on its own.
_reported: set[tuple[str, bool]] = set()


def report_once(shard: str, reason: str, whole: bool) -> None:
    """Warn about a corrupt shard the first time this process meets it."""
    if (shard, whole) in _reported:
        return
    _reported.add((shard, whole))
    if whole:
        msg = f"data: shard {shard} is unusable ({reason}); all its samples are skipped"
    else:
        msg = f"data: skipping corrupt samples of shard {shard} (first: {reason})"
    warnings.warn(f"{msg} and counted in data/skipped_samples", RuntimeWarning, stacklevel=3)


@dataclass
class SkipLedger:
    """Skipped and read sample counts of one rank's reader (cumulative; saved in its state)."""

    limit: float  # data.max_skipped_fraction
    floor: int  # this rank's share of one epoch of the shard sources
    skipped: int = 0
    read: int = 0  # dataset samples tried (skipped or not)
    by_shard: dict[str, int] = field(default_factory=dict)  # shard path -> samples skipped

    def record(self, read: int, skips: Iterable[Skip]) -> None:
        """Account for one batch's worth of tried samples.

        Raises:
            TooManySkippedSamples: the skipped fraction passed ``limit`` (or nothing was
                readable in a whole epoch's share, which no limit allows).
        """
        self.read += read
        for shard, reason, whole in skips:
            self.by_shard[shard] = self.by_shard.get(shard, 0) + 1
            self.skipped += 1
            report_once(shard, reason, whole)
        fraction = self.skipped / max(self.read, self.floor, 1)
        if fraction > self.limit or fraction >= 1.0:
            raise TooManySkippedSamples(self._too_many(fraction))

    def _too_many(self, fraction: float) -> str:
        worst = sorted(self.by_shard.items(), key=lambda kv: (-kv[1], kv[0]))
        shards = ", ".join(f"{path} ({n})" for path, n in worst[:_SHOWN_SHARDS])
        if len(worst) > _SHOWN_SHARDS:
            shards += f", and {len(worst) - _SHOWN_SHARDS} more"
        return (
            f"data: too many corrupt samples skipped: {self.skipped}, {fraction:.2%} of"
            f" {max(self.read, self.floor, 1)} (the samples this rank read, at least its share of"
            f" one epoch), above data.max_skipped_fraction={self.limit}; shards (samples"
            f" skipped): {shards}. Re-prepare or remove those shards, or raise the limit"
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain counts (keys shared with the reader's state dict)."""
        return {
            "skipped": self.skipped,
            "samples_read": self.read,
            "skipped_by_shard": dict(self.by_shard),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))  # states from before the ledger: no skips
        self.read = int(state.get("samples_read", 0))
        self.by_shard = {str(k): int(v) for k, v in state.get("skipped_by_shard", {}).items()}
