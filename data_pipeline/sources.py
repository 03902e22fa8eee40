"""Sources: deterministic, randomly addressable sample streams, and their weighted mixture.

Every source defines an infinite global sequence ``sample(n)``, n = 0, 1, 2, ..., that is a pure
function of (its files, its seed, n). That makes resumption a matter of one counter, lets
DataLoader workers split the work by batch without exchanging anything, and lets another
data-parallel world size re-split what is left (see ``reader``).

A shard source's sequence is its epochs back to back. Epoch e is the split's samples with the
shards in a seeded per-epoch order, shuffled inside consecutive blocks of ``shuffle_buffer``
samples (a bounded buffer: a sample moves at most ``shuffle_buffer - 1`` places), each block
with its own seeded permutation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipeline.errors import CorruptShardError, DataConfigError
from data_pipeline.shards import Manifest, ShardReader
from data_pipeline.synthetic import SyntheticTask, pack_row
from data_pipeline.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)

Window = tuple[np.ndarray, np.ndarray]  # tokens [n <= T+1], document starts [k]
Row = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids, labels, seq_idx, answer_mask
_MAX_OPEN = 64  # open shard files kept per process


def _cached(cache: dict, key: object, make: Callable[[], object], maxsize: int = 16) -> object:
    """A small per-object memo (plain dict: pickles, unlike a bound ``lru_cache``)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= maxsize:
            cache.pop(next(iter(cache)))
        value = cache[key] = make()
    return value


class ShardSource:
    """A prepared split read by random access, with seeded per-epoch order.

    ``sample(n)`` raises ``CorruptShardError`` for a corrupt sample; a shard that cannot be
    opened at all is remembered, so its other samples fail at once, without touching the file
    again. Whether that stops the run or skips the sample is the reader's call (``on_corrupt``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        seed: int,
        seq_len: int,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1024,
        verify_sha256: bool = True,
    ) -> None:
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        if split not in self.manifest.splits:
            raise DataConfigError(
                f"{self.root}: no split '{split}'; splits: {sorted(self.manifest.splits)}"
            )
        if seq_len != self.manifest.seq_len:
            raise DataConfigError(
                f"seq_len={seq_len} but {self.root} was prepared with seq_len={self.manifest.seq_len}"
            )
        self.shards = self.manifest.splits[split]
        self.counts = np.asarray([s.samples for s in self.shards], dtype=np.int64)
        self.n_per_epoch = int(self.counts.sum())
        if self.n_per_epoch == 0:
            raise DataConfigError(f"{self.root}: split '{split}' holds no samples")
        self.seed, self.seq_len = seed, seq_len
        self.shuffle_shards, self.buffer = shuffle_shards, max(1, shuffle_buffer)
        self.verify = verify_sha256
        self.dtype = np.dtype("<u2" if self.manifest.dtype == "uint16" else "<u4")
        self._readers: OrderedDict[int, ShardReader] = OrderedDict()
        self._bad_shards: dict[int, CorruptShardError] = {}  # shards that failed to open
        self._cache: dict = {}

    def fingerprint(self) -> list:
        """What the sequence depends on (a resume state is refused if this changes)."""
        return [
            "shards",
            [s.sha256 or f"{s.path}:{s.samples}" for s in self.shards],
            self.seed,
            self.shuffle_shards,
            self.buffer,
        ]

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def make() -> tuple[np.ndarray, np.ndarray]:
            n = len(self.shards)
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
            if not self.shuffle_shards:
                order = np.arange(n)
            first = np.concatenate([[0], np.cumsum(self.counts[order])])  # first sample of each
            return order, first

        return _cached(self._cache, ("epoch", epoch), make)  # type: ignore[return-value]

    def _block_perm(self, epoch: int, block: int, size: int) -> np.ndarray:
        def make() -> np.ndarray:
            return np.random.default_rng([self.seed, 1, epoch, block]).permutation(size)

        return _cached(self._cache, ("block", epoch, block), make)  # type: ignore[return-value]

    def locate(self, n: int) -> tuple[int, int]:
        """Global index ``n`` -> (shard index in the manifest, sample index in the shard)."""
        epoch, i = divmod(n, self.n_per_epoch)
        block, off = divmod(i, self.buffer)
        size = min(self.buffer, self.n_per_epoch - block * self.buffer)
        m = block * self.buffer + int(self._block_perm(epoch, block, size)[off])
        order, first = self._epoch_layout(epoch)
        pos = int(np.searchsorted(first, m, side="right")) - 1
        return int(order[pos]), m - int(first[pos])

    def _reader(self, shard: int) -> ShardReader:
        reader = self._readers.get(shard)
        if reader is not None:
            self._readers.move_to_end(shard)
            return reader
        reader = ShardReader(self.root, self.shards[shard], self.dtype, self.seq_len)
        reader.open(self.verify)  # raises CorruptShardError
        self._readers[shard] = reader
        if len(self._readers) > _MAX_OPEN:
            self._readers.popitem(last=False)[1].close()
        return reader

    def sample(self, n: int) -> Window:
        """The stored window at global index ``n``.

        Raises:
            CorruptShardError: the sample, or its whole shard (``sample`` None), is corrupt.
        """
        shard, idx = self.locate(n)
        bad = self._bad_shards.get(shard)
        if bad is not None:
            raise CorruptShardError(bad.shard, bad.reason)
        try:
            reader = self._reader(shard)
        except CorruptShardError as err:
            self._bad_shards[shard] = err
            raise
        return reader.read(idx)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class SyntheticSource:
    """A synthetic task as a source: global index ``n`` is row ``n`` of the task's stream."""

    def __init__(
        self, task: SyntheticTask, seq_len: int, seed: int, answers_only: bool = False
    ) -> None:
        if task.max_len(seq_len) > seq_len:
            raise DataConfigError(f"{task.name}: a problem does not fit in seq_len={seq_len}")
        self.task, self.seq_len, self.seed = task, seq_len, seed
        self.answers_only = answers_only
        self.n_per_epoch = None

    def fingerprint(self) -> list:
        settings = {f.name: getattr(self.task, f.name) for f in dataclasses.fields(self.task)}
        fp = ["synthetic", self.task.name, self.seed, repr(sorted(settings.items()))]
        return [*fp, "answers_only"] if self.answers_only else fp

    def sample(self, n: int) -> Row:
        """Row ``n`` of the task's stream."""
        row = pack_row(self.task, self.seq_len, self.seed, n)
        if self.answers_only:
            row["labels"] = row["labels"].masked_fill(~row["answer_mask"], IGNORE_INDEX)
        return tuple(row[k].numpy() for k in ("input_ids", "labels", "seq_idx", "answer_mask"))

    def close(self) -> None:
        pass


class Mixture:
    """A seeded, exactly stratified weighted choice of source for each global index.

    Weights are rounded to integers over ``2**20``; among the first n indices, source s gets
    exactly ``floor(n * C[s+1] / D) - floor(n * C[s] / D)`` (C: cumulative integer weights), and
    inside each chunk of ``chunk`` indices the choices are in a seeded random order. So the
    proportions hold at every scale, and ``choose(g)`` is O(chunk) with no history to replay.
    """

    DENOM = 1 << 20

    def __init__(self, weights: list[float], seed: int, chunk: int = 1024) -> None:
        if not weights or min(weights) < 0 or sum(weights) <= 0:
            raise DataConfigError(f"mixture weights must be >= 0 with a positive sum: {weights}")
        total = float(sum(weights))
        ints = [int(round(w / total * self.DENOM)) for w in weights]
        ints[int(np.argmax(ints))] += self.DENOM - sum(ints)
        self.cum = np.concatenate([[0], np.cumsum(ints)]).astype(np.int64)
        self.seed, self.chunk = seed, chunk
        self._cache: dict = {}

    def counts_before(self, n: int) -> np.ndarray:
        """[S] number of indices < n given to each source."""
        edges = (n * self.cum) // self.DENOM
        return np.diff(edges)

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _cached(self._cache, c, lambda: self._make_chunk(c), 8)  # type: ignore[return-value]

    def _make_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo = self.counts_before(c * self.chunk)
        quota = self.counts_before((c + 1) * self.chunk) - lo
        labels = np.repeat(np.arange(len(quota)), quota)
        labels = labels[np.random.default_rng([self.seed, 2, c]).permutation(len(labels))]
        occ = np.zeros(len(labels), dtype=np.int64)  # occurrence number of each label so far
        for s in range(len(quota)):
            where = labels == s
            occ[where] = np.arange(int(where.sum()))
        return labels, occ, lo

    def choose(self, g: int) -> tuple[int, int]:
        """Global mixed index ``g`` -> (source, that source's global index)."""
        c, off = divmod(g, self.chunk)
        labels, occ, lo = self._chunk(c)
        s = int(labels[off])
        return s, int(lo[s] + occ[off])
