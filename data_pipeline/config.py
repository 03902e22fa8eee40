"""Typed settings of the streaming reader. Invalid values raise ``DataConfigError`` naming the
field (the trainer maps it onto its own config error)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_pipeline.errors import DataConfigError

ON_CORRUPT = ("error", "skip")
SOURCE_LABELS = ("all", "answers")
# One bad shard in a hundred is bad luck; more is a broken copy or mount, which training on
# silently would hide (and the run would train on a skewed share of the data).
DEFAULT_MAX_SKIPPED_FRACTION = 0.01


def max_skipped_fraction_problem(value: float) -> str | None:
    """What is wrong with a ``data.max_skipped_fraction`` value (None: nothing)."""
    if 0.0 < value <= 1.0:
        return None
    return (
        f"data.max_skipped_fraction: must be in (0, 1] (a share of the samples read), got"
        f" {value!r}; data.on_corrupt=error allows no corrupt sample at all"
    )


@dataclass
class SourceConfig:
    """One source of the reader: a prepared dataset split or a synthetic task."""

    path: str | None = None  # prepared dataset directory (holds manifest.json)
    split: str = "train"  # split of ``path`` to read
    task: str | None = None  # or: a synthetic task name (data_pipeline.synthetic.TASKS)
    task_args: dict[str, Any] = field(default_factory=dict)  # that task's settings
    weight: float = 1.0  # relative share of samples in a mixture
    seed: int | None = None  # this source's seed; None: the reader seed + the source's index
    name: str | None = None  # label used in logs and metrics (default: path/split or task)
    # Synthetic tasks: "answers" keeps labels only where they are answer tokens, so the loss is
    # the task's (random premises and filler are unpredictable and otherwise swamp it).
    labels: str = "all"  # all | answers

    def __post_init__(self) -> None:
        if (self.path is None) == (self.task is None):
            raise DataConfigError("data source: give exactly one of 'path' and 'task'")
        if self.labels not in SOURCE_LABELS:
            raise DataConfigError(
                f"data source {self.label}: labels must be one of {list(SOURCE_LABELS)},"
                f" got {self.labels!r}"
            )
        if self.labels == "answers" and self.task is None:
            raise DataConfigError(
                f"data source {self.label}: labels=answers needs a synthetic task (shards have"
                " no answer positions)"
            )
        if self.weight < 0:
            raise DataConfigError(f"data source {self.label}: weight must be >= 0")

    @property
    def label(self) -> str:
        return self.name or (f"{self.path}:{self.split}" if self.path else str(self.task))


@dataclass
class ReaderConfig:
    """Streaming reader settings (per data-parallel rank)."""

    sources: list[SourceConfig]  # one source, or a weighted mixture
    batch_size: int = 8  # sequences per batch on each data-parallel rank
    seq_len: int = 2048  # must equal the seq_len the shards were prepared with
    seed: int = 0  # order of shards and samples per epoch, mixture choices
    shuffle_shards: bool = True  # shuffle the shard order each epoch
    shuffle_buffer: int = 1024  # samples shuffled together (bounded-buffer shuffle; 1: none)
    epochs: int | None = None  # single shard source: stop after this many; None: forever
    num_workers: int = 0  # DataLoader worker processes
    prefetch_factor: int = 2  # batches prefetched per worker
    on_corrupt: str = "error"  # corrupt or truncated shard: "error" (names it) or "skip"
    # on_corrupt=skip: error once more than this share of the samples read was skipped
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION
    verify_sha256: bool = True  # check each shard's sha256 on first open (reads it fully)
    mask_cross_document_labels: bool = False  # no label that predicts another document's token
    vocab_size: int | None = None  # for synthetic sources (default: the dataset's vocab size)

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataConfigError("data.sources: needs at least one source")
        for name in ("batch_size", "seq_len", "shuffle_buffer", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"data.{name}: must be >= 1")
        if self.num_workers < 0:
            raise DataConfigError("data.num_workers: must be >= 0")
        if self.on_corrupt not in ON_CORRUPT:
            raise DataConfigError(f"data.on_corrupt: must be one of {list(ON_CORRUPT)}")
        if problem := max_skipped_fraction_problem(self.max_skipped_fraction):
            raise DataConfigError(problem)
        if self.epochs is not None:
            if self.epochs < 1:
                raise DataConfigError("data.epochs: must be >= 1 (or null for no limit)")
            if len(self.sources) != 1 or self.sources[0].path is None:
                raise DataConfigError(
                    "data.epochs: applies to a single dataset source; mixtures and synthetic"
                    " tasks are infinite"
                )
        if sum(s.weight for s in self.sources) <= 0:
            raise DataConfigError("data.sources: weights must have a positive sum")
