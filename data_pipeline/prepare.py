"""``hydra-pretrain prepare``: text / JSONL / Parquet in, webdataset token shards out.

Documents are read in order by the main process, tokenised in parallel by worker processes (in
order, with bounded look-ahead), joined with EOS and cut into windows of ``seq_len + 1`` tokens
that overlap by one token; windows go to tar shards (``data_pipeline.shards``) and a
``manifest.json`` is written last. The output does not depend on the number of workers.

Layout of the output directory::

    manifest.json  tokenizer.json (BPE only)  train/shard-000000.{tar,idx} ...  val/...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataConfigError
from data_pipeline.inputs import (
    FORMATS,
    TEXT_UNITS,
    RawDoc,
    detect_format,
    expand_inputs,
    iter_documents,
)
from data_pipeline.shards import MANIFEST, Manifest, ShardInfo, ShardWriter, token_dtype
from data_pipeline.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, train_bpe

SPLITS = ("train", "val")
FIELD_PROBE_RECORDS = 1000  # JSONL records read up front to check that --field exists


@dataclass
class PrepareConfig:
    """Settings of one ``prepare`` run (the CLI flags, typed)."""

    inputs: list[str]  # paths, directories or globs
    output: str  # output directory
    format: str = "auto"  # auto | text | jsonl | parquet (auto: by file extension)
    field: str = "text"  # JSONL field / Parquet column holding the document text
    text_unit: str = "file"  # text files: one document per file | line | paragraph
    tokenizer: str = "byte"  # "byte" or a tokenizer.json path
    train_bpe: int | None = None  # train a byte-level BPE of this vocab size on the inputs
    seq_len: int = 2048  # tokens per training sequence (windows hold seq_len + 1)
    samples_per_shard: int = 1024  # windows per tar shard
    val_fraction: float = 0.0  # hold out this fraction of documents (seeded hash)
    val_docs: int = 0  # or exactly this many documents (seeded choice; counts documents first)
    seed: int = 0  # seed of the validation selection
    workers: int = 0  # tokenisation processes (0: in this process)
    chunk_docs: int = 256  # documents per tokenisation task
    overwrite: bool = False  # replace an existing prepared dataset in ``output``
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        if not self.inputs:
            raise DataConfigError("prepare: no inputs given")
        if self.format not in FORMATS:
            raise DataConfigError(f"--format: must be one of {list(FORMATS)}")
        if self.text_unit not in TEXT_UNITS:
            raise DataConfigError(f"--text-unit: must be one of {list(TEXT_UNITS)}")
        if self.seq_len < 1 or self.samples_per_shard < 1 or self.chunk_docs < 1:
            raise DataConfigError("--seq-len, --samples-per-shard and --chunk-docs must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataConfigError(f"--val-fraction: must be in [0, 1), got {self.val_fraction}")
        if self.val_docs < 0 or (self.val_docs and self.val_fraction):
            raise DataConfigError("give at most one of --val-fraction and --val-docs (>= 0)")
        if self.workers < 0:
            raise DataConfigError("--workers: must be >= 0")


# ----------------------------------------------------------------------- tokenisation workers

_TOKENIZER: ByteTokenizer | HFTokenizer | None = None


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _TOKENIZER = load_tokenizer(spec)


def _decode(doc: RawDoc, field_name: str, stats: Counter) -> str | None:
    """Raw record -> text; counts undecodable bytes and bad JSON records, never raises."""
    data = doc.data
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["undecodable_docs"] += 1
            text = data.decode("utf-8", errors="replace")
        if doc.kind == "jsonl":
            try:
                value = json.loads(text)
                text = value[field_name] if isinstance(value, dict) else None
            except (json.JSONDecodeError, KeyError):
                text = None
            if not isinstance(text, str):
                stats["bad_records"] += 1
                return None
        return text
    if data is None:  # a null Parquet value
        stats["empty_docs"] += 1
        return None
    if not isinstance(data, str):
        stats["bad_records"] += 1
        return None
    return data


def _tokenize_chunk(task: tuple[list[RawDoc], list[bool], str]) -> dict[str, Any]:
    """Tokenise one chunk; per split: concatenated tokens (docs + EOS) and document lengths."""
    docs, is_val, field_name = task
    tok = _TOKENIZER
    assert tok is not None
    stats: Counter = Counter()
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc, val in zip(docs, is_val, strict=True):
        text = _decode(doc, field_name, stats)
        if text is None:
            continue
        if not text.strip():
            stats["empty_docs"] += 1
            continue
        texts["val" if val else "train"].append(text)
    out: dict[str, Any] = {"stats": stats}
    eos = np.asarray([tok.eos_id], dtype=np.uint32)
    for split, items in texts.items():
        if not items:
            continue
        ids = tok.encode_batch(items)
        stats["docs_with_eos_inside"] += sum(int((a == tok.eos_id).any()) for a in ids)
        stats[f"{split}_documents"] += len(ids)
        parts = [p for a in ids for p in (a, eos)]
        out[split] = (np.concatenate(parts), np.asarray([len(a) + 1 for a in ids], np.int64))
    return out


def _ordered_map(
    fn: Callable, tasks: Iterable, workers: int, spec: str, max_pending: int
) -> Iterator[Any]:
    """``map(fn, tasks)`` over worker processes, in order, reading ahead at most ``max_pending``."""
    if workers == 0:
        _init_worker(spec)
        yield from map(fn, tasks)
        return
    # Not fork: a forked child inherits whatever locks this process's threads held at that
    # moment (tqdm's monitor, logging, the tokenizers pool, a test runner's threads) and can
    # hang on one forever (seen: a prepare under pytest). forkserver children start from a
    # clean single-threaded server; the variable keeps the tokenizers library quiet in them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, _init_worker, (spec,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- packing


class SplitWriter:
    """Windows -> rolling shards ``shard-NNNNNN`` of one split."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, per_shard: int) -> None:
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.dtype, self.per_shard = split, dtype, per_shard
        self.shards: list[ShardInfo] = []
        self._w: ShardWriter | None = None

    def write(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        if self._w is None:
            self._w = ShardWriter(self.dir, f"shard-{len(self.shards):06d}", self.dtype)
        self._w.write(tokens, starts)
        if self._w.samples == self.per_shard:
            self.shards.append(self._w.close(self.split))
            self._w = None

    def close(self) -> list[ShardInfo]:
        if self._w is not None:
            self.shards.append(self._w.close(self.split))
            self._w = None
        return self.shards


class WindowPacker:
    """Concatenated documents -> windows of ``seq_len + 1`` tokens, consecutive ones overlapping
    by one token, each with the positions where documents start inside it."""

    def __init__(self, seq_len: int, writer: SplitWriter) -> None:
        self.T = seq_len
        self.writer = writer
        self._buf = np.zeros(0, dtype=np.uint32)
        self._starts = np.zeros(0, dtype=np.int64)  # document starts, as positions in _buf
        self.windows = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        doc_starts = len(self._buf) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        buf = np.concatenate([self._buf, tokens])
        starts = np.concatenate([self._starts, doc_starts])
        self.tokens += len(tokens)
        n = (len(buf) - 1) // self.T
        bounds = np.searchsorted(starts, np.arange(n + 1) * self.T)
        ends = np.searchsorted(starts, np.arange(n) * self.T + self.T, side="right")
        for w in range(n):
            lo = w * self.T
            self.writer.write(buf[lo : lo + self.T + 1], starts[bounds[w] : ends[w]] - lo)
        self.windows += n
        keep = n * self.T
        self._buf = buf[keep:]
        self._starts = starts[bounds[n] :] - keep

    def finish(self) -> None:
        # After a window, one token is left over: the last label of that window, already stored.
        if len(self._buf) > 1 or (self.windows == 0 and len(self._buf) > 0):
            self.writer.write(self._buf, self._starts)
            self.windows += 1
        self._buf = self._buf[:0]


# -------------------------------------------------------------------------- validation split


def _unit_hash(seed: int, i: int) -> float:
    """A uniform number in [0, 1) from (seed, i): splitmix64, stable across processes."""
    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def _val_selector(cfg: PrepareConfig, files: list[Path]) -> Callable[[int], bool]:
    """Whether raw document ``i`` (counted over all inputs in order) goes to the val split."""
    if cfg.val_fraction > 0:
        return lambda i: _unit_hash(cfg.seed, i) < cfg.val_fraction
    if cfg.val_docs > 0:
        total = sum(
            doc is not None
            for _, doc in iter_documents(files, cfg.format, cfg.field, cfg.text_unit)
        )
        if cfg.val_docs >= total:
            raise DataConfigError(
                f"--val-docs={cfg.val_docs} leaves no training documents ({total})"
            )
        chosen = set(np.random.default_rng(cfg.seed).choice(total, cfg.val_docs, replace=False))
        return lambda i: i in chosen
    return lambda i: False


def _check_field(cfg: PrepareConfig, files: list[Path]) -> None:
    """Refuse a JSONL ``--field`` that none of the first records has, before anything is written:
    a typo, not a dataset of bad records (it would make an empty dataset). Names the fields seen.
    (Parquet inputs check their column when opened.)"""
    jsonl = [f for f in files if detect_format(f, cfg.format) == "jsonl"]
    seen: set[str] = set()
    objects = 0
    with contextlib.closing(iter_documents(jsonl, "jsonl", cfg.field, cfg.text_unit)) as docs:
        for _path, doc in docs:
            try:
                value = json.loads(doc.data) if doc is not None else None
            except ValueError:  # a malformed record is counted later, as a bad record
                continue
            if not isinstance(value, dict):
                continue
            if cfg.field in value:
                return
            seen.update(map(str, value))
            objects += 1
            if objects == FIELD_PROBE_RECORDS:
                break
    if objects:
        first = ", the first ones" if objects == FIELD_PROBE_RECORDS else ""
        raise DataConfigError(
            f"--field {cfg.field!r}: no JSONL record has it ({objects} checked{first}); fields"
            f" seen: {sorted(seen)[:20]}"
        )


# ------------------------------------------------------------------------------- output dir


def _claim_output(out: Path, overwrite: bool) -> Path:
    """Check ``out`` may be written; return a fresh temporary directory inside it."""
    if out.exists() and not out.is_dir():
        raise DataConfigError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prepare-tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if entries:
        if not overwrite:
            raise DataConfigError(
                f"output directory {out} is not empty ({', '.join(sorted(entries)[:5])});"
                " pass --overwrite to replace a prepared dataset"
            )
        if not (out / MANIFEST).is_file():
            raise DataConfigError(
                f"--overwrite replaces only a prepared dataset, and {out} has no {MANIFEST};"
                " choose an empty directory"
            )
    tmp = out / f".prepare-tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path, manifest: Manifest) -> None:
    """Move the finished shards into place; the manifest goes last, so it never names a shard
    that is not there."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in (*SPLITS, "tokenizer.json"):
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (tmp / name).exists():
            os.replace(tmp / name, old)
    manifest.save(out)
    shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------- driver


def _chunks(
    cfg: PrepareConfig, files: list[Path], is_val: Callable[[int], bool], stats: Counter
) -> Iterator[tuple[list[RawDoc], list[bool], str]]:
    docs: list[RawDoc] = []
    flags: list[bool] = []
    i = 0
    for _path, doc in iter_documents(files, cfg.format, cfg.field, cfg.text_unit):
        if doc is None:
            stats["empty_files"] += 1
            continue
        docs.append(doc)
        flags.append(is_val(i))
        i += 1
        if len(docs) == cfg.chunk_docs:
            yield docs, flags, cfg.field
            docs, flags = [], []
    stats["raw_documents"] = i
    if docs:
        yield docs, flags, cfg.field


def _build_tokenizer(cfg: PrepareConfig, files: list[Path], tmp: Path) -> tuple[Any, str]:
    """The tokenizer and the spec workers load it from (BPE is saved into the output)."""
    if cfg.train_bpe is None:
        tok = load_tokenizer(cfg.tokenizer)
        if isinstance(tok, ByteTokenizer):
            return tok, "byte"
    else:
        texts = [f for f in files if detect_format(f, cfg.format) == "text"]
        if len(texts) != len(files) or any(f.suffix == ".gz" for f in files):
            raise DataConfigError(
                "--train-bpe trains on plain (uncompressed) text inputs only; train on text"
                " files and pass the result with --tokenizer"
            )
        tok = train_bpe(texts, cfg.train_bpe)
    tok.save(tmp / "tokenizer.json")
    return tok, str(tmp / "tokenizer.json")


def prepare_dataset(cfg: PrepareConfig) -> dict[str, Any]:
    """Run ``prepare``: tokenise, pack and shard the inputs; write the manifest.

    Returns:
        The summary (also stored in the manifest's ``stats``).

    Raises:
        DataConfigError: missing inputs, a refused output directory or bad settings.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    files = expand_inputs(cfg.inputs)
    _check_field(cfg, files)
    out = Path(cfg.output)
    tmp = _claim_output(out, cfg.overwrite)
    try:
        tok, spec = _build_tokenizer(cfg, files, tmp)
        dtype = token_dtype(tok.vocab_size)
        splits = ("train", "val") if (cfg.val_fraction or cfg.val_docs) else ("train",)
        packers = {
            s: WindowPacker(cfg.seq_len, SplitWriter(tmp, s, dtype, cfg.samples_per_shard))
            for s in splits
        }
        stats: Counter = Counter()
        tasks = _chunks(cfg, files, _val_selector(cfg, files), stats)
        bar = tqdm(unit="doc", desc="prepare", disable=not cfg.progress, file=sys.stderr)
        for result in _ordered_map(_tokenize_chunk, tasks, cfg.workers, spec, 2 * cfg.workers + 2):
            stats.update(result["stats"])
            for s in splits:
                if s in result:
                    packers[s].add(*result[s])
            bar.update(sum(result["stats"][f"{s}_documents"] for s in splits))
            bar.set_postfix(tokens=sum(p.tokens for p in packers.values()))
        bar.close()
        for p in packers.values():
            p.finish()
        shards = {s: p.writer.close() for s, p in packers.items()}
        summary = _summary(stats, packers, shards, files, time.perf_counter() - t0)
        manifest = Manifest(
            seq_len=cfg.seq_len,
            dtype=dtype.name,
            vocab_size=tok.vocab_size,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            bos_id=tok.bos_id,
            tokenizer={**tok.describe(), **({"file": "tokenizer.json"} if spec != "byte" else {})},
            splits=shards,
            stats=summary,
        )
        _publish(tmp, out, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(
    stats: Counter, packers: dict, shards: dict, files: list[Path], seconds: float
) -> dict[str, Any]:
    tokens = sum(p.tokens for p in packers.values())
    out: dict[str, Any] = {
        "input_files": len(files),
        "empty_files": stats["empty_files"],
        "raw_documents": stats["raw_documents"],
        "empty_documents": stats["empty_docs"],
        "undecodable_documents": stats["undecodable_docs"],
        "bad_records": stats["bad_records"],
        "documents_with_eos_inside": stats["docs_with_eos_inside"],
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9)),
    }
    for s, p in packers.items():
        out[s] = {
            "documents": stats[f"{s}_documents"],
            "tokens": p.tokens,
            "samples": p.windows,
            "shards": len(shards[s]),
        }
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable report of a ``prepare`` run."""
    lines = []
    for s in SPLITS:
        if s in summary:
            v = summary[s]
            lines.append(
                f"{s:>5}: {v['documents']:,} documents, {v['tokens']:,} tokens,"
                f" {v['samples']:,} samples in {v['shards']} shards"
            )
    lines.append(
        f"time: {summary['seconds']:.2f} s, {summary['tokens_per_second']:,} tokens/s;"
        f" input files: {summary['input_files']}"
    )
    lines.append(
        "skipped: {empty_files} empty files, {empty_documents} empty documents,"
        " {bad_records} bad records; {undecodable_documents} documents had undecodable bytes"
        " (replaced by U+FFFD); {documents_with_eos_inside} documents contain the EOS token".format(
            **summary
        )
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` flags to ``parser`` (the lead's CLI calls this)."""
    d = PrepareConfig(inputs=["-"], output="-")
    parser.add_argument("inputs", nargs="+", help="input files, directories or globs")
    parser.add_argument("-o", "--output", required=True, help="output directory")
    parser.add_argument(
        "--format", default=d.format, choices=FORMATS, help="input format; auto: by file extension"
    )
    parser.add_argument("--field", default=d.field, help="JSONL field / Parquet column")
    parser.add_argument(
        "--text-unit",
        default=d.text_unit,
        choices=TEXT_UNITS,
        help="what one document is in a text file: the whole file, a line or a paragraph",
    )
    parser.add_argument("--tokenizer", default=d.tokenizer, help="'byte' or a tokenizer.json")
    parser.add_argument(
        "--train-bpe",
        type=int,
        default=None,
        metavar="VOCAB",
        help="train a byte-level BPE of VOCAB tokens on the inputs (default: use --tokenizer)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=d.seq_len, help="tokens per training sequence"
    )
    parser.add_argument(
        "--samples-per-shard", type=int, default=d.samples_per_shard, help="sequences per tar shard"
    )
    val = parser.add_mutually_exclusive_group()
    val.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of documents as the val split (seeded hash)",
    )
    val.add_argument(
        "--val-docs",
        type=int,
        default=0,
        help="or hold out exactly this many documents (seeded choice)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the validation choice")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="tokenisation processes (0: in this process); the output does not depend on it",
    )
    parser.add_argument(
        "--chunk-docs", type=int, default=d.chunk_docs, help="documents per tokenisation task"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed flags; print the summary. Returns the exit code (0, or 2 on
    a configuration or input error, printed as one line)."""
    try:
        cfg = PrepareConfig(
            inputs=list(args.inputs),
            output=args.output,
            format=args.format,
            field=args.field,
            text_unit=args.text_unit,
            tokenizer=args.tokenizer,
            train_bpe=args.train_bpe,
            seq_len=args.seq_len,
            samples_per_shard=args.samples_per_shard,
            val_fraction=args.val_fraction,
            val_docs=args.val_docs,
            seed=args.seed,
            workers=args.workers,
            chunk_docs=args.chunk_docs,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        summary = prepare_dataset(cfg)
    except DataConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.prepare ...`` (same flags as ``hydra-pretrain prepare``)."""
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__.splitlines()[0])
    add_prepare_arguments(parser)
    return run_prepare(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
