"""Typed data section of a run config: weighted sources (synthetic tasks or prepared shards).

Sources are ``data_pipeline.config.SourceConfig`` (one definition for the reader and the run
config); the rest of the reader's settings come from here and from the train/curriculum sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_pipeline.config import (
    DEFAULT_MAX_SKIPPED_FRACTION,
    ON_CORRUPT,
    ReaderConfig,
    SourceConfig,
    max_skipped_fraction_problem,
)
from pretrain.config_errors import ConfigError


def _default_sources() -> list[SourceConfig]:
    return [SourceConfig(task="chaining", name="chaining")]


@dataclass
class DataConfig:
    """Where training and evaluation tokens come from."""

    sources: list[SourceConfig] = field(default_factory=_default_sources)
    eval_split: str = "val"  # shard sources: the held-out split read by evaluation
    mask_cross_document_labels: bool = True  # no loss on predicting another document's token
    on_corrupt: str = "error"  # corrupt shard: error (naming it) | skip (left out, counted)
    # on_corrupt=skip: stop with an error once more than this share of the samples read was
    # skipped (counted per data-parallel rank; metric data/skipped_samples)
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION
    verify_sha256: bool = False  # check each shard's sha256 against the manifest on first open
    num_workers: int = 0  # DataLoader workers
    shuffle_buffer: int = 256  # samples in the seeded shuffle buffer

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources: needs at least one source")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"data.sources: names must be unique, got {labels}")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: the weights must not all be 0")
        if self.on_corrupt not in ON_CORRUPT:
            raise ConfigError(f"data.on_corrupt: must be one of {list(ON_CORRUPT)}")
        if problem := max_skipped_fraction_problem(self.max_skipped_fraction):
            raise ConfigError(problem)
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.shuffle_buffer >= 1")


def source_reads(
    data: DataConfig, stages: list[tuple[int, dict[str, float]]], eval_seq_len: int | None
) -> list[set[tuple[str, int]]]:
    """For each source of ``data``, the (split, seq_len) pairs the run will read it at.

    Args:
        stages: each stage's sequence length and mixture (empty: every source, as
            ``reader_config`` builds them; otherwise the sources the mixture gives weight).
        eval_seq_len: evaluation's sequence length (it reads ``eval_split`` of shard sources),
            or None when the run never evaluates.
    """
    reads: list[set[tuple[str, int]]] = [set() for _ in data.sources]
    for seq_len, mixture in stages:
        for i, src in enumerate(data.sources):
            if not mixture or mixture.get(src.label, 0.0) > 0:
                reads[i].add((src.split, seq_len))
    if eval_seq_len is not None:
        for i, src in enumerate(data.sources):
            reads[i].add((data.eval_split if src.path is not None else src.split, eval_seq_len))
    return reads


def reader_config(
    data: DataConfig,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    vocab_size: int,
    mixture: dict[str, float] | None = None,
    split: str | None = None,
) -> ReaderConfig:
    """The reader settings for one stage (its sequence length and mixture) or for evaluation.

    Args:
        mixture: source label -> weight, overriding the sources' own weights (curriculum).
        split: read this split of every shard source instead of its own (evaluation).
    """
    sources = []
    for src in data.sources:
        weight = mixture.get(src.label, 0.0) if mixture else src.weight
        changes = {"weight": weight, "name": src.label}
        if split is not None and src.path is not None:
            changes["split"] = split
        sources.append(SourceConfig(**{**src.__dict__, **changes}))
    if mixture:  # sources with weight 0 are dropped: a mixture of what the stage asks for
        sources = [s for s in sources if s.weight > 0]
    return ReaderConfig(
        sources=sources,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        shuffle_buffer=data.shuffle_buffer,
        num_workers=data.num_workers,
        on_corrupt=data.on_corrupt,
        max_skipped_fraction=data.max_skipped_fraction,
        verify_sha256=data.verify_sha256,
        mask_cross_document_labels=data.mask_cross_document_labels,
        vocab_size=vocab_size,
    )
