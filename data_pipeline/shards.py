"""Token shards: webdataset tar files of packed token windows, a byte-offset index beside each,
and the dataset manifest.

A sample is one window of up to ``seq_len + 1`` token ids (consecutive windows overlap by one
token, so every token is a label exactly once); only a split's last window may be shorter.
Members of sample ``key`` (plain webdataset, readable with ``webdataset.WebDataset``)::

    key.tokens.u16 | key.tokens.u32   little-endian token ids
    key.starts.u32                    positions (in the window) where a document starts
    key.crc32                         8 hex digits: CRC-32 of tokens bytes then starts bytes

``shard-NNNNNN.idx`` beside each tar holds n+1 little-endian uint64: the byte offset of each
sample's first header and the end of the last sample, so a reader fetches any sample with one
``pread`` instead of scanning the tar (exact resume and worker splitting need random access).
The per-sample CRC makes a flipped byte a detected error, never a silently wrong sample, even
when the (optional, costlier) whole-shard sha256 check is off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from data_pipeline.errors import CorruptShardError, DataConfigError

MANIFEST = "manifest.json"
FORMAT_NAME = "hydra-token-shards"
FORMAT_VERSION = 1
_BLOCK = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _ext(dtype: np.dtype) -> str:
    return "tokens.u16" if dtype.itemsize == 2 else "tokens.u32"


def sample_crc(tokens: bytes, starts: bytes) -> str:
    """The CRC-32 stored with a sample (hex)."""
    return f"{zlib.crc32(starts, zlib.crc32(tokens)):08x}"


class _HashingFile:
    """Write-through file wrapper that hashes what passes and counts bytes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


@dataclass
class ShardInfo:
    """One shard's manifest entry."""

    path: str  # tar path relative to the dataset directory
    samples: int  # windows in the shard
    tokens: int  # label tokens (sum of window lengths - 1)
    sha256: str | None = None  # of the tar file
    index_sha256: str | None = None  # of the .idx file
    bytes: int = 0

    @property
    def index_path(self) -> str:
        return self.path[: -len(".tar")] + ".idx"


class ShardWriter:
    """Writes one shard: tar via ``webdataset.TarWriter`` plus its offset index and checksums."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype) -> None:
        import webdataset as wds

        self.dir = directory
        self.name = name
        self.dtype = dtype
        self._file = _HashingFile(open(directory / f"{name}.tar", "wb"))  # noqa: SIM115
        # Fixed mtime and owner: the same input gives byte-identical shards.
        self._tw = wds.TarWriter(self._file, encoder=False, mtime=0, user="", group="")
        self._offsets: list[int] = []
        self.samples = 0
        self.tokens = 0

    def write(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Append one window (``tokens`` of any int dtype, ``starts`` positions in the window)."""
        tok_bytes = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        st_bytes = np.ascontiguousarray(starts, dtype="<u4").tobytes()
        self._offsets.append(self._tw.tarstream.offset)
        self._tw.write(
            {
                "__key__": f"{self.name}-{self.samples:08d}",
                _ext(self.dtype): tok_bytes,
                "starts.u32": st_bytes,
                "crc32": sample_crc(tok_bytes, st_bytes).encode(),
            }
        )
        self.samples += 1
        self.tokens += len(tokens) - 1

    def close(self, rel_dir: str) -> ShardInfo:
        """Finish the tar and the index; return the manifest entry."""
        self._offsets.append(self._tw.tarstream.offset)
        self._tw.close()
        idx = np.asarray(self._offsets, dtype="<u8").tobytes()
        (self.dir / f"{self.name}.idx").write_bytes(idx)
        tar_path = self.dir / f"{self.name}.tar"
        return ShardInfo(
            path=f"{rel_dir}/{self.name}.tar",
            samples=self.samples,
            tokens=self.tokens,
            sha256=self._file.sha.hexdigest(),
            index_sha256=hashlib.sha256(idx).hexdigest(),
            bytes=tar_path.stat().st_size,
        )


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """``manifest.json`` of a prepared dataset."""

    seq_len: int
    dtype: str  # "uint16" | "uint32"
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    tokenizer: dict[str, Any]
    splits: dict[str, list[ShardInfo]]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "tokenizer": self.tokenizer,
            "splits": {
                name: {
                    "samples": sum(s.samples for s in shards),
                    "tokens": sum(s.tokens for s in shards),
                    "shards": [s.__dict__ for s in shards],
                }
                for name, shards in self.splits.items()
            },
            "stats": self.stats,
        }

    def save(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, directory / MANIFEST)  # a manifest exists only once it is complete

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise DataConfigError(f"no {MANIFEST} in {directory}: not a prepared dataset")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
            raise DataConfigError(
                f"{path}: unknown format {data.get('format')}/{data.get('version')}"
            )
        return cls(
            seq_len=data["seq_len"],
            dtype=data["dtype"],
            vocab_size=data["vocab_size"],
            eos_id=data["eos_id"],
            pad_id=data["pad_id"],
            bos_id=data.get("bos_id"),
            tokenizer=data["tokenizer"],
            splits={
                name: [ShardInfo(**s) for s in split["shards"]]
                for name, split in data["splits"].items()
            },
            stats=data.get("stats", {}),
        )


def _parse_header(buf: memoryview, pos: int) -> tuple[str, int]:
    """(member name, data size) of the ustar header at ``pos``."""
    head = bytes(buf[pos : pos + _BLOCK])
    if len(head) < _BLOCK:
        raise ValueError("header cut short")
    name = head[:100].split(b"\0", 1)[0].decode("ascii")
    prefix = head[345:500].split(b"\0", 1)[0].decode("ascii") if head[257:262] == b"ustar" else ""
    size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    return (f"{prefix}/{name}" if prefix else name), size


def _scan_offsets(path: Path) -> np.ndarray:
    """Sample offsets of a tar without an index file (slow path: walks every header)."""
    offsets: list[int] = []
    last_key = None
    end = 0
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            key = m.name.split(".", 1)[0]
            if key != last_key:
                offsets.append(m.offset)
                last_key = key
            end = m.offset_data + ((m.size + _BLOCK - 1) // _BLOCK) * _BLOCK
    offsets.append(end)
    return np.asarray(offsets, dtype=np.uint64)


class ShardReader:
    """Random access to the samples of one shard, with integrity checks.

    ``open()`` checks size, index and (optionally) sha256 once; ``read(i)`` returns sample ``i``
    as ``(tokens, starts)`` after checking its member names, sizes and CRC. Any failure raises
    ``CorruptShardError`` naming the shard.
    """

    def __init__(self, root: Path, info: ShardInfo, dtype: np.dtype, seq_len: int) -> None:
        self.path = root / info.path
        self.index_path = root / info.index_path
        self.info = info
        self.dtype = dtype
        self.seq_len = seq_len
        self._fd: int | None = None
        self.offsets: np.ndarray | None = None

    def open(self, verify_sha256: bool) -> None:
        """Open, check and index the shard (raises ``CorruptShardError``)."""
        name = str(self.path)
        if not self.path.is_file():
            raise CorruptShardError(name, "file is missing")
        try:
            if verify_sha256 and self.info.sha256 and file_sha256(self.path) != self.info.sha256:
                raise CorruptShardError(name, "sha256 does not match the manifest")
            size = self.path.stat().st_size
            if self.index_path.is_file():
                raw = self.index_path.read_bytes()
                if verify_sha256 and self.info.index_sha256:
                    if hashlib.sha256(raw).hexdigest() != self.info.index_sha256:
                        raise CorruptShardError(name, "index sha256 does not match the manifest")
                offsets = np.frombuffer(raw, dtype="<u8")
            else:
                offsets = _scan_offsets(self.path)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise CorruptShardError(name, f"cannot read the tar or its index: {err}") from None
        if len(offsets) != self.info.samples + 1 or bool(
            (np.diff(offsets.astype(np.int64)) <= 0).any()
        ):
            raise CorruptShardError(
                name, f"index lists {len(offsets) - 1} samples, manifest says {self.info.samples}"
            )
        if int(offsets[-1]) > size:
            raise CorruptShardError(
                name, f"truncated: {size} bytes, samples need {int(offsets[-1])}"
            )
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:  # e.g. no read permission: as unusable as a missing file
            raise CorruptShardError(name, f"cannot open: {err}") from None
        # a reader dropped without close() (an eval reader, a finished stage's) must not keep
        # its descriptor: they added up to hundreds in one process
        self._closer = weakref.finalize(self, os.close, self._fd)
        self.offsets = offsets

    def close(self) -> None:
        if self._fd is not None:
            self._closer()
            self._fd = None

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i``: (tokens [n <= seq_len+1], document starts [k]) after integrity checks."""
        assert self.offsets is not None and self._fd is not None, "open() the shard first"
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        buf = memoryview(os.pread(self._fd, end - start, start))
        try:
            members = self._split(buf)
            tok_name = _ext(self.dtype)
            tok, st, crc = members[tok_name], members["starts.u32"], members["crc32"]
            if sample_crc(tok, st).encode() != bytes(crc):
                raise ValueError("CRC mismatch")
            tokens = np.frombuffer(tok, dtype=self.dtype)
            starts = np.frombuffer(st, dtype="<u4")
            if not 1 <= len(tokens) <= self.seq_len + 1:
                raise ValueError(f"window of {len(tokens)} tokens")
        except (ValueError, KeyError, UnicodeDecodeError) as err:
            raise CorruptShardError(str(self.path), f"sample {i}: {err}", sample=i) from None
        return tokens, starts

    def _split(self, buf: memoryview) -> dict[str, memoryview]:
        members: dict[str, memoryview] = {}
        pos, key = 0, None
        while pos < len(buf):
            name, size = _parse_header(buf, pos)
            k, ext = name.split(".", 1)
            if key is not None and k != key:
                raise ValueError(f"member {name} of another sample")
            key = k
            data_end = pos + _BLOCK + size
            if data_end > len(buf):
                raise ValueError("member data cut short")
            members[ext] = buf[pos + _BLOCK : data_end]
            pos += _BLOCK + ((size + _BLOCK - 1) // _BLOCK) * _BLOCK
        return members
