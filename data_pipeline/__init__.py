"""Data pipeline: tokenizers, token shards, the resumable streaming reader, synthetic tasks.

Modules (import what you need; importing this package pulls in nothing heavy):

- ``tokens``: special token ids, defined once (PAD=0, BOS=1, EOS=2, task markers, ...).
- ``tokenizer``: byte-level tokenizer; byte-level BPE trained locally or loaded from JSON.
- ``inputs``, ``prepare``: text / JSONL / Parquet -> webdataset token shards + manifest
  (``hydra-pretrain prepare``).
- ``shards``: the shard format (tar + offset index + per-sample CRC) and the manifest.
- ``sources``, ``batching``, ``reader``, ``config``: the streaming reader (``build_reader``)
  with exact resume, rank/worker splitting, mixtures and corrupt-shard handling; ``skips``:
  the count of skipped corrupt samples and its limit.
- ``synthetic``: chaining, distant premise, associative recall, domain mixture, fact lookup.
- ``errors``: ``DataConfigError``, ``DataExhausted``, ``CorruptShardError``,
  ``TooManySkippedSamples``.
"""

from data_pipeline.errors import CorruptShardError, DataConfigError, DataExhausted

__all__ = ["CorruptShardError", "DataConfigError", "DataExhausted"]
