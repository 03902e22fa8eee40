"""Data pipeline throughput: ``prepare`` and streaming reads, side by side with raw reads.

Builds a synthetic text corpus, prepares it (byte tokenizer; 1 and N tokenisation processes),
then reads the train split for one epoch with the streaming reader (in-process, 1 and N
DataLoader workers) and, as ceilings, (a) a plain sequential read of the same tar bytes and
(b) a sequential ``webdataset`` iteration that decodes the token arrays. Prints a table and
writes JSON.

    python benchmarks/data_throughput.py --mb 64 --workers 2 --json-out throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.config import ReaderConfig, SourceConfig  # noqa: E402
from data_pipeline.errors import DataExhausted  # noqa: E402
from data_pipeline.prepare import PrepareConfig, prepare_dataset  # noqa: E402
from data_pipeline.reader import build_reader  # noqa: E402
from data_pipeline.shards import Manifest  # noqa: E402
from data_pipeline.tokenizer import train_bpe  # noqa: E402


def write_corpus(directory: Path, megabytes: float, seed: int = 0) -> None:
    """Documents of random words (1-20 KB each) in a few JSONL and text files."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(5000)
    ]
    target, written, k = int(megabytes * 2**20), 0, 0
    while written < target:
        with open(directory / f"part-{k:03d}.jsonl", "w") as f:
            for _ in range(200):
                doc = " ".join(rng.choices(words, k=rng.randint(200, 3000)))
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
        k += 1


def train_tokenizer(src: Path, out: Path, vocab: int) -> Path:
    """A BPE trained on the first corpus file (text extracted from the JSONL)."""
    text = out / "bpe-train.txt"
    with open(src / "part-000.jsonl") as f:
        text.write_text("\n".join(json.loads(line)["text"] for line in f))
    tok = train_bpe([text], vocab)
    tok.save(out / "tokenizer.json")
    return out / "tokenizer.json"


def bench_prepare(src: Path, out: Path, seq_len: int, workers: int, tokenizer: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s = prepare_dataset(
        PrepareConfig(
            inputs=[str(src / "*.jsonl")],
            output=str(out),
            seq_len=seq_len,
            samples_per_shard=512,
            workers=workers,
            tokenizer=tokenizer,
            progress=False,
        )
    )
    dt = time.perf_counter() - t0
    return {
        "tokens": s["train"]["tokens"],
        "seconds": dt,
        "tokens_per_s": s["train"]["tokens"] / dt,
    }


def bench_raw(ds: Path) -> dict:
    """Sequential read of every tar byte (1 MiB reads): the I/O ceiling."""
    man = Manifest.load(ds)
    tokens = sum(s.tokens for s in man.splits["train"])
    t0 = time.perf_counter()
    nbytes = 0
    for info in man.splits["train"]:
        with open(ds / info.path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                nbytes += len(chunk)
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "bytes": nbytes, "seconds": dt, "tokens_per_s": tokens / dt}


def bench_webdataset(ds: Path) -> dict:
    """Sequential webdataset iteration, decoding each token array (no shuffle, no checks)."""
    import webdataset as wds

    man = Manifest.load(ds)
    urls = [str(ds / s.path) for s in man.splits["train"]]
    ext = "tokens.u16" if man.dtype == "uint16" else "tokens.u32"
    dtype = "<u2" if man.dtype == "uint16" else "<u4"
    t0 = time.perf_counter()
    tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        tokens += len(np.frombuffer(sample[ext], dtype=dtype)) - 1
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def bench_stream(ds: Path, seq_len: int, workers: int, verify: bool, batch: int) -> dict:
    cfg = ReaderConfig(
        sources=[SourceConfig(path=str(ds))],
        batch_size=batch,
        seq_len=seq_len,
        epochs=1,
        num_workers=workers,
        verify_sha256=verify,
        shuffle_buffer=1024,
    )
    reader = build_reader(cfg)
    t0 = time.perf_counter()
    tokens = 0
    try:
        for b in reader:
            tokens += int((b["labels"] != -100).sum())
    except DataExhausted:
        pass
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=32.0, help="corpus size (MiB of text)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bpe-vocab", type=int, default=8192)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="N")
    p.add_argument("--json-out", default=None, help="write the results here (JSON)")
    p.add_argument("--keep", default=None, help="keep the corpus and shards in this directory")
    args = p.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="data-bench-"))
    src, ds = work / "src", work / "ds"
    src.mkdir(parents=True, exist_ok=True)
    if not list(src.glob("*.jsonl")):
        write_corpus(src, args.mb)
    n = args.workers
    rows: dict[str, dict] = {}
    bpe = str(train_tokenizer(src, work, args.bpe_vocab))
    for tok_name, tok in (("BPE", bpe), ("byte", "byte")):  # the byte shards are read below
        rows[f"prepare ({tok_name}), in-process"] = bench_prepare(src, ds, args.seq_len, 0, tok)
        if n > 1:
            rows[f"prepare ({tok_name}), {n} processes"] = bench_prepare(
                src, ds, args.seq_len, n, tok
            )
    rows["raw sequential read of the tar bytes"] = bench_raw(ds)
    rows["webdataset sequential iteration"] = bench_webdataset(ds)
    for w in sorted({0, 1, n}):
        label = "in-process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        rows[f"stream, {label}"] = bench_stream(ds, args.seq_len, w, False, args.batch_size)
    rows["stream, in-process, sha256 check"] = bench_stream(
        ds, args.seq_len, 0, True, args.batch_size
    )
    raw = rows["raw sequential read of the tar bytes"]["tokens_per_s"]
    print(f"{'measurement':<42} {'tokens':>12} {'seconds':>9} {'Mtok/s':>9} {'vs raw':>7}")
    for name, r in rows.items():
        r["ratio_to_raw"] = r["tokens_per_s"] / raw
        print(
            f"{name:<42} {r['tokens']:>12,} {r['seconds']:>9.3f}"
            f" {r['tokens_per_s'] / 1e6:>9.2f} {r['ratio_to_raw']:>7.3f}"
        )
    result = {
        "config": {**vars(args), "cpu_count": os.cpu_count()},
        "results": rows,
    }
    text = json.dumps(result, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
