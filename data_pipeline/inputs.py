"""Input documents for ``prepare``: paths and globs of text, JSONL or Parquet files.

The main process only reads raw records (bytes or strings); decoding, JSON parsing and
tokenisation happen in the worker processes (``prepare._tokenize_chunk``).
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.errors import DataConfigError

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_UNITS = ("file", "line", "paragraph")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths and globs -> files, in the given order (each glob sorted), without duplicates.

    Raises:
        DataConfigError: a path does not exist or a glob matches nothing.
    """
    files: list[Path] = []
    for pat in patterns:
        if glob.has_magic(pat):
            matches = sorted(p for p in glob.glob(pat, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataConfigError(f"input glob matches no file: {pat}")
            files += [Path(p) for p in matches]
        else:
            p = Path(pat)
            if p.is_dir():
                files += sorted(q for q in p.rglob("*") if q.is_file())
            elif p.is_file():
                files.append(p)
            else:
                raise DataConfigError(f"input path not found: {pat}")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)  # a file named twice (path and glob) is read once
    return list(unique.values())


def detect_format(path: Path, fmt: str) -> str:
    """The format of ``path``: ``fmt`` unless ``auto``, else from its extension."""
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


@dataclass
class RawDoc:
    """One raw record: ``kind`` is ``text`` (bytes), ``jsonl`` (a line, bytes) or ``str``."""

    kind: str
    data: bytes | str | None


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _text_docs(path: Path, unit: str) -> Iterator[RawDoc]:
    with _open(path) as f:
        data = f.read()
    if unit == "file":
        yield RawDoc("text", data)
    elif unit == "line":
        for line in data.splitlines():
            yield RawDoc("text", line)
    else:
        para: list[bytes] = []
        for line in data.splitlines(keepends=True):
            if line.strip():
                para.append(line)
            elif para:
                yield RawDoc("text", b"".join(para).rstrip(b"\r\n"))
                para = []
        if para:
            yield RawDoc("text", b"".join(para).rstrip(b"\r\n"))


def _jsonl_docs(path: Path) -> Iterator[RawDoc]:
    with _open(path) as f:
        for line in f:
            if line.strip():
                yield RawDoc("jsonl", line)


def _parquet_docs(path: Path, column: str) -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataConfigError(f"cannot read Parquet file {path}: {err}") from None
    if column not in pf.schema_arrow.names:
        raise DataConfigError(
            f"Parquet file {path} has no column '{column}'; columns: {pf.schema_arrow.names}"
        )
    for batch in pf.iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield RawDoc("str", value)


def iter_documents(
    files: list[Path], fmt: str, field: str, text_unit: str
) -> Iterator[tuple[Path, RawDoc | None]]:
    """Every raw document of ``files`` in order; ``(path, None)`` marks an empty file."""
    if fmt not in FORMATS:
        raise DataConfigError(f"format: must be one of {list(FORMATS)}, got {fmt!r}")
    if text_unit not in TEXT_UNITS:
        raise DataConfigError(f"text unit: must be one of {list(TEXT_UNITS)}, got {text_unit!r}")
    for path in files:
        if path.stat().st_size == 0:
            yield path, None
            continue
        kind = detect_format(path, fmt)
        if kind == "text":
            docs = _text_docs(path, text_unit)
        elif kind == "jsonl":
            docs = _jsonl_docs(path)
        else:
            docs = _parquet_docs(path, field)
        for doc in docs:
            yield path, doc
