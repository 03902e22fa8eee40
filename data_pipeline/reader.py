"""The streaming reader: deterministic, exactly resumable batches for one data-parallel rank.

The sample order is global: a sequence ``X[g]``, g = 0, 1, ..., fixed by the sources and the
seed (``sources.py``). Data-parallel rank r of W takes ``g = base + j * W + r`` for its local
samples j = 0, 1, ...; batch q is local samples ``[q*B, (q+1)*B)``. DataLoader worker k of K
builds batches q with ``q % K == k``; the DataLoader's in-order round-robin fetch hands them back
as q = 0, 1, 2, ..., so the batches are the same for any worker count.

The position is then one number, the global samples consumed, ``base + batches * B * W``. It is
the same on every rank (ranks step in lock-step), so a state saved by any rank resumes every
rank, with any worker count, on any world size or batch size: the new layout starts at that
global index (``base``) and deals the rest out again. Samples that the old ranks had prefetched
but not consumed are not lost.

``on_corrupt=skip`` leaves corrupt samples out and refills the batch from the rank's next block
of B samples (``StreamingReader``), so after a skip the position is per rank (block, rows of
it already handed out), and ``skips.SkipLedger`` counts what was skipped against the limit.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batching import PACKED_KEY, unpack_batch, windows_to_rows
from data_pipeline.config import ReaderConfig, SourceConfig
from data_pipeline.errors import CorruptShardError, DataConfigError, DataExhausted
from data_pipeline.shards import Manifest
from data_pipeline.skips import SkipLedger
from data_pipeline.sources import Mixture, ShardSource, SyntheticSource
from data_pipeline.tokens import PAD_ID

STATE_VERSION = 1
_SKIP_KEY = "_skipped"  # per block: (samples tried, skipped ones), removed by the reader


def _build_source(cfg: ReaderConfig, src: SourceConfig, index: int, vocab: int | None):
    seed = src.seed if src.seed is not None else cfg.seed + index
    if src.path is not None:
        return ShardSource(
            src.path,
            src.split,
            seed=seed,
            seq_len=cfg.seq_len,
            shuffle_shards=cfg.shuffle_shards,
            shuffle_buffer=cfg.shuffle_buffer,
            verify_sha256=cfg.verify_sha256,
        )
    from data_pipeline.synthetic import build_task

    if vocab is None:
        raise DataConfigError(f"data source {src.label}: set data.vocab_size for synthetic tasks")
    task = build_task(src.task, vocab, **src.task_args)
    return SyntheticSource(task, cfg.seq_len, seed, answers_only=src.labels == "answers")


def _check_manifests(manifests: list[Manifest], vocab_size: int | None) -> tuple[int, int]:
    """Shard sources must share one tokenizer; returns (pad id, vocab size to use)."""
    ids = {(m.vocab_size, m.eos_id, m.pad_id, m.tokenizer.get("sha256")) for m in manifests}
    if len(ids) > 1:
        raise DataConfigError(
            "data sources were prepared with different tokenizers (vocab, eos, pad, sha256):"
            f" {sorted(ids, key=str)}"
        )
    m = manifests[0]
    if vocab_size is not None and vocab_size < m.vocab_size:
        raise DataConfigError(
            f"data.vocab_size={vocab_size} is smaller than the dataset's vocabulary ({m.vocab_size})"
        )
    return m.pad_id, vocab_size or m.vocab_size


class BatchStream(IterableDataset):
    """Batches ``start_batch, start_batch + 1, ...`` of one rank (dealt over DataLoader workers).

    Sources are built lazily in the process that reads (each worker opens its own files).
    """

    def __init__(self, cfg: ReaderConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.base = 0  # global samples consumed before this layout
        self.start_batch = 0
        self._sources: list | None = None
        self.vocab_size = cfg.vocab_size
        self.pad_id = PAD_ID
        shard_sources = [s for s in cfg.sources if s.path is not None]
        manifests = [Manifest.load(s.path) for s in shard_sources]
        if manifests:
            self.pad_id, self.vocab_size = _check_manifests(manifests, cfg.vocab_size)
        self.total = self._total_samples()
        self.shard_samples = sum(  # one epoch of every shard source (a missing split: later)
            info.samples
            for s, m in zip(shard_sources, manifests)
            for info in m.splits.get(s.split, [])
        )

    def __getstate__(self) -> dict:
        # Open file descriptors do not survive pickling (spawned workers): rebuild there.
        state = self.__dict__.copy()
        state["_sources"] = None
        return state

    def sources(self) -> list:
        if self._sources is None:
            self._sources = [
                _build_source(self.cfg, s, i, self.vocab_size)
                for i, s in enumerate(self.cfg.sources)
            ]
            self._mixture = Mixture([s.weight for s in self.cfg.sources], self.cfg.seed)
        return self._sources

    def _total_samples(self) -> int | None:
        if self.cfg.epochs is None:
            return None
        src = self.cfg.sources[0]
        per_epoch = sum(s.samples for s in Manifest.load(src.path).splits[src.split])
        return per_epoch * self.cfg.epochs

    def samples_per_epoch(self) -> int | None:
        """Samples in one epoch of a single shard source (None for mixtures and synthetic)."""
        sources = self.sources()
        if len(sources) == 1 and isinstance(sources[0], ShardSource):
            return sources[0].n_per_epoch
        return None

    def batches_available(self) -> int | None:
        """Batches this rank can still take from ``base`` (None: unlimited); equal on all ranks."""
        if self.total is None:
            return None
        return max(self.total - self.base, 0) // self.world_size // self.cfg.batch_size

    def fingerprint(self) -> str:
        """Hash of everything that fixes the global order."""
        parts = [s.fingerprint() for s in self.sources()]
        parts.append([s.weight for s in self.cfg.sources])
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def batch(self, q: int) -> dict[str, Any]:
        """Batch ``q`` of this rank, packed (pure function of the files, config and ``base``).

        With ``on_corrupt=skip`` a corrupt sample is left out: the batch then holds fewer than
        ``batch_size`` rows, and ``_SKIP_KEY`` lists what was skipped (the reader refills).
        """
        sources = self.sources()
        B, W, T = self.cfg.batch_size, self.world_size, self.cfg.seq_len
        windows, at, rows, which, skips, tried = [], [], {}, [], [], 0
        for j in range(q * B, (q + 1) * B):
            g = self.base + j * W + self.rank
            s, n = (0, g) if len(sources) == 1 else self._mixture.choose(g)
            if isinstance(sources[s], SyntheticSource):
                rows[len(which)] = sources[s].sample(n)
            else:
                tried += 1
                try:
                    windows.append(sources[s].sample(n))
                except CorruptShardError as err:
                    if self.cfg.on_corrupt == "error":
                        raise
                    skips.append((err.shard, err.reason, err.sample is None))
                    continue
                at.append(len(which))
            which.append(s)
        packed = np.empty((3, len(which), T), dtype=np.int32)
        if windows:
            packed[:, at] = windows_to_rows(
                windows, T, self.pad_id, self.cfg.mask_cross_document_labels
            )
        out: dict[str, torch.Tensor] = {}
        if any(isinstance(s, SyntheticSource) for s in sources):
            answer = np.zeros((len(which), T), dtype=bool)
            for i, (ids, labels, seq_idx, mask) in rows.items():
                packed[:, i] = (ids, labels, seq_idx)
                answer[i] = mask
            out["answer_mask"] = torch.from_numpy(answer)
        out[PACKED_KEY] = torch.from_numpy(packed)
        if len(sources) > 1:
            out["source"] = torch.tensor(which, dtype=torch.int64)
        out[_SKIP_KEY] = (tried, skips)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        end = self.batches_available()
        q = self.start_batch + k
        while end is None or q < end:
            yield self.batch(q)
            q += n_workers


def _n_rows(batch: dict[str, torch.Tensor]) -> int:
    return batch[PACKED_KEY].shape[1]


def _row_slice(batch: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: v[:, lo:hi] if k == PACKED_KEY else v[lo:hi] for k, v in batch.items()}


def _first_rows(
    parts: list[dict[str, torch.Tensor]], n: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The first ``n`` rows of packed batches ``parts`` (in order), and the rows after them."""
    if len(parts) == 1 and _n_rows(parts[0]) == n:
        return parts[0], None  # nothing was skipped: the batch passes through untouched
    joined = {k: torch.cat([p[k] for p in parts], dim=int(k == PACKED_KEY)) for k in parts[0]}
    total = _n_rows(joined)
    return _row_slice(joined, 0, n), (_row_slice(joined, n, total) if total > n else None)


class StreamingReader:
    """Iterable of batches for one data-parallel rank, with exact ``state_dict`` resume.

    Each batch is a dict of [B, T] tensors: ``input_ids``, ``labels`` (-100 = ignore),
    ``seq_idx``; plus ``answer_mask`` (bool) when a synthetic source is present and ``source``
    [B] (index into ``cfg.sources``) for a mixture. After the last batch of a finite reader the
    next request raises ``DataExhausted``.

    With ``on_corrupt=skip`` a corrupt sample is left out, and the rank's next samples fill
    its place (so no row repeats): from then on this rank's batch ``i`` is no longer its
    ``i``-th block of ``B`` samples, and its position is (block, good rows of it already handed
    out). The blocks are still built in order and the rows taken in order, so the batches stay
    a pure function of the files, the config and the position, for any worker count.
    """

    def __init__(self, cfg: ReaderConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise DataConfigError(f"data-parallel rank={rank} not in [0, world_size={world_size})")
        self.cfg = cfg
        self.stream = BatchStream(cfg, rank, world_size)
        self.batches = 0  # batches handed out since the last load_state_dict
        # Position: the next rows are block ``_next``'s good rows (blocks counted from
        # ``stream.base``) after its first ``_partial``. Without skips, _next == batches.
        self._next = 0
        self._partial = 0
        share = -(-self.stream.shard_samples // world_size)  # this rank's share of an epoch
        self.ledger = SkipLedger(cfg.max_skipped_fraction, share)

    @property
    def skipped(self) -> int:
        """Corrupt samples this rank skipped (cumulative; kept in the state)."""
        return self.ledger.skipped

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start, drop, B = self._next, self._partial, self.cfg.batch_size
        self.stream.start_batch = start
        workers = self.cfg.num_workers
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            persistent_workers=False,
        )
        blocks = iter(loader)
        pending: list[dict[str, torch.Tensor]] = []
        try:
            for fetched, block in enumerate(blocks, start=1):
                tried, skips = block.pop(_SKIP_KEY)
                block_rows = _n_rows(block)
                if fetched == 1 and drop:  # rows (and skips) already counted before the save
                    block = _row_slice(block, drop, block_rows)
                else:
                    self.ledger.record(tried, skips)
                pending.append(block)
                if sum(_n_rows(p) for p in pending) < B:
                    continue
                batch, rest = _first_rows(pending, B)
                pending = [rest] if rest is not None else []
                # rows left over all come from the newest block (fewer than B were pending)
                left = _n_rows(rest) if rest is not None else 0
                self._next = start + fetched - (1 if left else 0)
                self._partial = block_rows - left if left else 0
                self.batches += 1
                yield unpack_batch(batch)
        except Exception as err:
            # A worker's error comes with DataLoader frames in a reference cycle that keeps the
            # workers alive until a garbage collection, which then waits seconds to join them.
            traceback.clear_frames(err.__traceback__)
            raise
        finally:
            del blocks
        raise DataExhausted(
            f"data exhausted after {self.cfg.epochs} epochs ({self.batches} batches since resume)"
        )

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by all ranks together (the resume position; with skips,
        this rank's: ranks that skipped different numbers of samples are at different blocks)."""
        return self.stream.base + self._next * self.cfg.batch_size * self.stream.world_size

    def state_dict(self) -> dict[str, Any]:
        """The position, and the skip account; identical on every rank in lock-step training
        unless corrupt samples were skipped."""
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.stream.fingerprint(),
            "consumed_samples": self.consumed_samples,
            "partial_rows": self._partial,
            "world_size": self.stream.world_size,
            "batch_size": self.cfg.batch_size,
            **self.ledger.state_dict(),
        }
        per_epoch = self.stream.samples_per_epoch()
        if per_epoch:  # for people reading checkpoints; resuming uses consumed_samples only
            state["epoch"], state["sample_in_epoch"] = divmod(self.consumed_samples, per_epoch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state``'s position, on this reader's (possibly other) world size.

        Raises:
            DataConfigError: the state belongs to other data (sources, seed or shuffle changed).
        """
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"reader state version {state.get('version')} not supported")
        if state["fingerprint"] != self.stream.fingerprint():
            raise DataConfigError(
                "reader state was saved for other data (sources, seeds or shuffle settings"
                " differ); refusing to resume at a position that would mean something else"
            )
        self.stream.base = int(state["consumed_samples"])
        self.batches = self._next = 0
        same_layout = (state.get("world_size"), state.get("batch_size")) == (
            self.stream.world_size,
            self.cfg.batch_size,
        )
        # Rows of a partly used block mean nothing in another layout: re-read them (a few
        # repeats, only after a skip) rather than guess.
        self._partial = int(state.get("partial_rows", 0)) if same_layout else 0
        self.ledger.load_state_dict(state)

    def __len__(self) -> int:
        """Batches left on this rank (finite readers only; at most this many after a skip)."""
        left = self.stream.batches_available()
        if left is None:
            raise TypeError("an infinite reader has no length")
        return left - self._next


def build_reader(cfg: ReaderConfig, rank: int = 0, world_size: int = 1) -> StreamingReader:
    """The reader of data-parallel ``rank`` of ``world_size`` (pass the data-parallel rank and
    size, not the global ones: with expert or context parallelism they differ)."""
    return StreamingReader(cfg, rank, world_size)
