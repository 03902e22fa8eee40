"""From text files to a training run (docs/data.md): ``hydra-pretrain prepare`` on a slice of the
standard library with a trained BPE and a held-out split, then the tiny Hydra trained on it with
evaluation (loss, perplexity) and an exact resume; and the shipped text configs agree with the
``prepare`` commands that make their data."""

from __future__ import annotations

import math
import re
import sysconfig
from pathlib import Path

import pytest

from data_pipeline.shards import Manifest
from data_pipeline.tokenizer import load_tokenizer
from launch.cli import main as cli_main
from parallel.dist import DistInfo
from pretrain.build import build_trainer
from pretrain.config import load_config
from tests.pretrain.train_worker import stop_after
from tests.pretrain.trainer_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# ~100 KB of modules every CPython 3.10+ ships
MODULES = ("textwrap", "shlex", "heapq", "numbers", "glob", "copy", "sched", "fnmatch", "colorsys")
VOCAB, SEQ_LEN = 300, 64  # 28 merges over the 16 special ids and 256 bytes


def _prepare(out: Path) -> Manifest:
    files = [str(STDLIB / f"{name}.py") for name in MODULES]
    args = ["prepare", *files, "-o", str(out), "--train-bpe", str(VOCAB), "--val-docs", "2"]
    args += ["--seq-len", str(SEQ_LEN), "--samples-per-shard", "32", "--workers", "0"]
    assert cli_main([*args, "--no-progress"]) == 0
    return Manifest.load(out)


def _train(data: Path, run_dir: Path, stop_at: int = 0) -> list[dict]:
    """The tiny Hydra (FAST, 4 steps of 4 x 64 tokens) on ``data``, evaluated every 2 steps on
    a batch of its val split; ``stop_at``: stop after that step as a SIGTERM would (checkpoint,
    exit)."""
    overrides = [
        *FAST,
        f"model.vocab_size={VOCAB}",
        f"data.sources=[{{name: text, path: {data}}}]",
        "train.steps=4",
        "train.eval_every=2",
        "train.eval_batches=1",
        f"run.dir={run_dir}",
    ]
    trainer = build_trainer(load_config(TINY, overrides), DistInfo(), log=lambda m: None)
    if stop_at:
        stop_after(trainer, stop_at)
    return trainer.run()


def test_stdlib_text_prepares_trains_evaluates_and_resumes_exactly(tmp_path: Path) -> None:
    manifest = _prepare(tmp_path / "data")
    assert manifest.vocab_size == VOCAB and manifest.tokenizer["kind"] == "bpe"
    assert manifest.stats["val"]["documents"] == 2 and manifest.stats["train"]["documents"] == 7
    tok = load_tokenizer(tmp_path / "data")
    source = (STDLIB / "textwrap.py").read_text()
    assert tok.decode(tok.encode(source)) == source  # byte-level BPE: lossless
    assert len(tok.encode(source)) < 0.8 * len(source.encode())  # the merges compress

    full = _train(tmp_path / "data", tmp_path / "full")
    losses = [row["loss"] for row in full if "loss" in row]
    evals = [row for row in full if "eval/loss" in row]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert [row["step"] for row in evals] == [2, 4]
    for row in evals:
        assert row["eval/perplexity"] == math.exp(row["eval/loss"]) > 1.0
        assert 0 < row["eval/tokens"] <= 4 * SEQ_LEN  # a batch of the val split
    # from about ln(300) = 5.7 at the start (the uniform guess), going down on held-out files
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"] < math.log(VOCAB)

    first = _train(tmp_path / "data", tmp_path / "split", stop_at=2)
    assert [row["step"] for row in first if "loss" in row] == [1, 2]
    second = _train(tmp_path / "data", tmp_path / "split")
    assert _numbers(first + second) == _numbers(full)  # bitwise, evaluations included


def _numbers(rows: list[dict]) -> list[dict]:
    """The loss and evaluation rows without their timings."""
    keys = ("step", "loss", "grad_norm", "lr", "eval/loss", "eval/perplexity", "eval/tokens")
    return [{k: r[k] for k in keys if k in r} for r in rows if "loss" in r or "eval/loss" in r]


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name} \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile: no {name}"
    return match.group(1)


def test_text_configs_match_the_prepare_commands_that_make_their_data() -> None:
    """hydra-29m-text reads what `make text-data` writes (path, vocabulary, sequence length);
    hydra-1.6b mixes shards from the documented `prepare --train-bpe 32768` command with the
    synthetic tasks; both load without the data (only `train`'s preflight needs it)."""
    text = load_config(REPO / "configs/hydra-29m-text.yaml")
    (src,) = text.data.sources
    assert src.path == _makefile_var("TEXT_DATA") and text.data.eval_split == "val"
    assert text.model.vocab_size == int(_makefile_var("TEXT_VOCAB"))
    assert text.train.seq_len == int(_makefile_var("TEXT_SEQ_LEN")) and text.train.eval_every > 0

    path = REPO / "configs/hydra-1.6b.yaml"
    big = load_config(path)
    shards = [s for s in big.data.sources if s.path is not None]
    tasks = [s for s in big.data.sources if s.task is not None]
    assert len(shards) == 1 and tasks and all(s.weight > 0 for s in big.data.sources)
    lines = [line.strip().lstrip("#").strip() for line in path.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("hydra-pretrain prepare "))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    flags = " ".join(" ".join(lines[start : end + 1]).replace("\\", " ").split()) + " "
    assert f"-o {shards[0].path} " in flags
    assert f"--train-bpe {big.model.vocab_size} " in flags
    assert f"--seq-len {big.train.seq_len} " in flags and "--val-fraction" in flags
    assert big.model.vocab_size == 32768
