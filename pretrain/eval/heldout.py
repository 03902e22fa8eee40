"""Held-out loss and perplexity on a prepared shard set, read with the project's reader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.config import ReaderConfig, SourceConfig
from data_pipeline.errors import DataConfigError, DataExhausted
from data_pipeline.reader import StreamingReader, build_reader
from data_pipeline.shards import Manifest
from pretrain.eval.errors import EvalError
from pretrain.evaluate import evaluate


def _first_batches(reader: StreamingReader, limit: int) -> Iterator[dict[str, torch.Tensor]]:
    # One epoch at most: a small validation split ends before ``limit``, which is fine here.
    batches = iter(reader)
    for _ in range(limit):
        try:
            yield next(batches)
        except DataExhausted:
            return


def shard_reader(
    data_dir: str | Path, split: str, batch_size: int, seed: int, vocab_size: int, max_seq_len: int
) -> StreamingReader:
    """A one-epoch reader of ``split`` of the prepared dataset in ``data_dir``.

    Raises:
        EvalError: not a prepared dataset, no such split, a vocabulary larger than the model's,
            or rows longer than the model takes.
    """
    try:
        manifest = Manifest.load(data_dir)
    except (DataConfigError, OSError, ValueError) as err:
        raise EvalError(f"--data {data_dir}: {err}") from None
    if split not in manifest.splits:
        raise EvalError(f"--data {data_dir}: no split '{split}'; splits: {sorted(manifest.splits)}")
    samples = sum(s.samples for s in manifest.splits[split])
    if samples == 0:
        raise EvalError(f"--data {data_dir}: split '{split}' holds no samples")
    if manifest.seq_len > max_seq_len:
        raise EvalError(
            f"--data {data_dir}: rows of {manifest.seq_len} tokens, the model takes at most"
            f" {max_seq_len}"
        )
    try:
        cfg = ReaderConfig(
            sources=[SourceConfig(path=str(data_dir), split=split)],
            batch_size=min(batch_size, samples),  # a tiny split still gives one batch
            seq_len=manifest.seq_len,
            seed=seed,
            shuffle_shards=False,
            shuffle_buffer=1,
            epochs=1,
            mask_cross_document_labels=True,  # as training reads shards (data config default)
            vocab_size=vocab_size,
        )
        return build_reader(cfg)
    except DataConfigError as err:
        raise EvalError(f"--data {data_dir}: {err}") from None


def evaluate_shards(
    model: nn.Module, reader: StreamingReader, batches: int, device: torch.device
) -> dict[str, Any]:
    """Token-weighted loss and perplexity of ``model`` over up to ``batches`` batches of
    ``reader`` (``shard_reader``; built first, so that bad data fails before any work).

    Returns:
        {``loss``, ``perplexity``, ``tokens``, ``path``, ``split``, ``seq_len``}.
    """
    scores = evaluate(model, _first_batches(reader, batches), device)
    source = reader.cfg.sources[0]
    return {
        "loss": scores["eval/loss"],
        "perplexity": scores["eval/perplexity"],
        "tokens": scores["eval/tokens"],
        "path": source.path,
        "split": source.split,
        "seq_len": reader.cfg.seq_len,
    }
