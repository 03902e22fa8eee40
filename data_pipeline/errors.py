"""Exceptions of the data pipeline.

``data_pipeline`` does not import ``pretrain``: the trainer maps ``DataConfigError`` onto its own
``ConfigError`` where it wants one message type.
"""

from __future__ import annotations


class DataConfigError(ValueError):
    """A data setting (or a combination of them) that cannot work; the message names the setting."""


class DataExhausted(Exception):
    """A reader with a finite number of epochs has no more batches.

    Deliberately not ``StopIteration``: inside a generator that would silently end the caller's
    loop (PEP 479 turns it into ``RuntimeError`` instead), hiding where the data ran out.
    """


class CorruptShardError(RuntimeError):
    """A shard is truncated, fails its checksum or holds a malformed sample; names the shard.

    ``sample`` is the index of the bad sample in the shard, or None when the whole shard is
    unusable (missing, truncated, unreadable index, wrong sha256).
    """

    def __init__(self, shard: str, reason: str | None = None, sample: int | None = None) -> None:
        # One-argument form: the full message, as DataLoader rebuilds a worker's exception.
        super().__init__(shard if reason is None else f"corrupt shard {shard}: {reason}")
        self.shard = shard
        self.reason = reason or ""
        self.sample = sample


class TooManySkippedSamples(RuntimeError):
    """``on_corrupt=skip`` skipped more than ``data.max_skipped_fraction`` of the samples read;
    the message names the count, the fraction, the limit and the shards involved."""
