"""Small prepared datasets shared by the data pipeline tests (built once per session)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.shards import Manifest, ShardReader


def make_docs(n: int, seed: int = 0, max_len: int = 60) -> list[str]:
    """Distinct documents of varied length (some longer than a window)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "ηta", "θ", "iota", "kappa"]
    return [
        f"doc{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, max_len)))
        for i in range(n)
    ]


def read_windows(root: Path, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
    """Every stored window of a split, in manifest order (the unshuffled order)."""
    man = Manifest.load(root)
    dtype = np.dtype("<u2" if man.dtype == "uint16" else "<u4")
    out = []
    for info in man.splits[split]:
        reader = ShardReader(root, info, dtype, man.seq_len)
        reader.open(verify_sha256=True)
        out += [reader.read(i) for i in range(info.samples)]
        reader.close()
    return out


def prepare_docs(docs: list[str], src: Path, out: Path, seq_len: int, per_shard: int) -> Path:
    """Documents, one a line in ``src``/docs.txt, prepared into ``out`` (byte tokenizer)."""
    (src / "docs.txt").write_text("\n".join(docs) + "\n")
    prepare_dataset(
        PrepareConfig(
            inputs=[str(src / "docs.txt")],
            output=str(out),
            text_unit="line",
            seq_len=seq_len,
            samples_per_shard=per_shard,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """53 windows of 16 tokens in 8 shards of up to 7 (byte tokenizer)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("ds") / "small"
    return prepare_docs(make_docs(30, seed=1, max_len=8), src, out, seq_len=16, per_shard=7)
