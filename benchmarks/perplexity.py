"""Perplexity of model configs trained from scratch for the same tokens on real text.

Run:  python benchmarks/perplexity.py --device cuda                   # the three 29m models
      python benchmarks/perplexity.py --configs configs/hydra-29m.yaml \\
          configs/transformer-29m.yaml --tokens 2_000_000 --seq-len 1024
      python benchmarks/perplexity.py --prepare-only                  # only build the corpus

Corpus: plain text that ships with every machine of this project (and CI's): the license texts
in ``/usr/share/common-licenses``, the uncompressed ``copyright``, ``README*`` and ``*.txt`` files
under ``/usr/share/doc``, then the ``.py`` sources of the interpreter's standard library (no
``site-packages``; its tests last). The groups (``--sources``) are taken in that order, each
sorted by path; a file is skipped when it cannot be read, is compressed, holds a NUL byte, is
not UTF-8 or repeats an earlier file byte for byte (many packages ship the same ``copyright``).
The longest prefix of that list within ``--corpus-mb`` is the corpus: one document per file.

It is prepared once with ``hydra-pretrain prepare``'s pipeline (``data_pipeline.prepare``): a
byte-level BPE of ``--vocab`` (trained on the whole corpus, held-out files included: the same
tokenizer for every model), windows of ``--seq-len`` + 1 tokens, and ``--val-fraction`` of the
files (a seeded choice, at least one) held out as the ``val`` split. The reader shuffles the
shard order and then only inside blocks of ``data.shuffle_buffer`` consecutive windows, so with
prepare's 1024-window shards and the default 256-window buffer a short run sees a few
neighbouring files only. Hence small shards (``--samples-per-shard``, 32) and a large buffer
(``--shuffle-buffer``, 4096): two tiny models at 200K tokens went from held-out loss 7.41 / 7.78
(train 5.8 / 6.5) to 5.99 / 6.47 (train 5.7 / 6.2).
``--data-dir`` keeps it; a later call with the same settings and the same files reuses it
(``corpus.json`` there records the settings and the file list).

Each config (``--configs``, with the shared dotted overrides ``--set``) is trained by the real
trainer (``python -m launch.train``) in its own process, from scratch, on the ``train`` split,
for ``--tokens`` tokens (steps = tokens // (batch x seq_len), rounded down): the same seed,
batch, sequence length and LR schedule for every model, one curriculum stage with every
component on, the vocabulary of the BPE, checkpoints and tracking off. Every ``--eval-every``
steps and at the end the trainer scores ``--eval-batches`` held-out batches (the same windows
for every model; by default the whole split); perplexity = exp(eval loss per token).

Beside the results, per model (from a meta-device build of the same config, no memory):
parameters, forward FLOPs per token of attention and of the whole model and training FLOPs per
token at ``--seq-len`` (``pretrain.flops``), and the inference cache bytes of one sequence at
``--seq-len`` and at 8192 tokens (``pretrain.models.cache``).

Output: a markdown table, ``--out`` JSON (settings, corpus, per model) and a PNG beside it
(``--plot``): held-out loss against training tokens, one line per model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks._figures import save_figure  # noqa: E402
from data_pipeline.errors import DataConfigError  # noqa: E402
from data_pipeline.prepare import PrepareConfig, format_summary, prepare_dataset  # noqa: E402
from data_pipeline.shards import MANIFEST, Manifest  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.flops import count_flops  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.cache import inference_cache_bytes  # noqa: E402
from pretrain.models.params import count_parameters  # noqa: E402
from pretrain.models.paths import PATH_NAMES  # noqa: E402
from pretrain.plots import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [f"configs/{name}-29m.yaml" for name in ("hydra", "transformer", "mamba2")]
LONG_CONTEXT = 8192  # the second context length of the inference cache column
CORPUS_RECORD = "corpus.json"  # beside the manifest: the settings and files it was made from
COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".lzma", ".zip", ".Z", ".br")
# Keys this script sets for every run: a --set of one of them would make the runs unequal.
OWN_KEYS = (
    "data.sources", "data.eval_split", "data.shuffle_buffer", "curriculum.stages",
    "model.vocab_size", "train.steps", "train.batch_size", "train.grad_accum", "train.seq_len", "train.lr",
    "train.warmup_steps", "train.schedule", "train.seed", "train.eval_every",
    "train.eval_batches", "train.device", "run.dir",
)  # fmt: skip


# ----------------------------------------------------------------------------- corpus


def _stdlib_files(tests: bool) -> list[Path]:
    """The standard library's ``.py`` files, without site-packages; its tests or the rest."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen = []
    for dirpath, dirnames, filenames in os.walk(root):
        # installed packages differ between machines (and are most of the bytes): not walked
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        parts = set(Path(dirpath).relative_to(root).parts)
        if bool(parts & {"test", "tests", "idle_test"}) == tests:
            chosen += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(chosen)


def _doc_files() -> list[Path]:
    def wanted(p: Path) -> bool:
        return p.name == "copyright" or p.name.startswith("README") or p.suffix == ".txt"

    return sorted(p for p in Path("/usr/share/doc").rglob("*") if wanted(p))


# name -> (what it is, its files in order)
SOURCES: dict[str, tuple[str, Callable[[], list[Path]]]] = {
    "licenses": (
        "/usr/share/common-licenses/*",
        lambda: sorted(Path("/usr/share/common-licenses").rglob("*")),
    ),
    "docs": ("copyright, README*, *.txt under /usr/share/doc", _doc_files),
    "stdlib": ("standard library .py sources (no tests)", lambda: _stdlib_files(tests=False)),
    "stdlib-tests": ("standard library test .py sources", lambda: _stdlib_files(tests=True)),
}


@dataclass
class Corpus:
    """The chosen files and what was left out on the way."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # files and bytes per source
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    digest: str = ""  # sha256 over (path, content sha256) of every chosen file

    def summary(self) -> dict[str, Any]:
        return {
            "files": len(self.files),
            "bytes": self.bytes,
            "mb": round(self.bytes / 1e6, 3),
            "groups": self.groups,
            "skipped": self.skipped,
            "sha256": self.digest,
        }


def _plain_text(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes if it is uncompressed UTF-8 text, else None and the reason."""
    if not path.is_file():
        return None, "not_a_file"
    if path.suffix in COMPRESSED:
        return None, "compressed"
    try:
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    if not data.strip():
        return None, "empty"
    if b"\0" in data:
        return None, "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    return data, ""


def select_corpus(sources: list[str], max_bytes: int) -> Corpus:
    """The longest prefix of the ordered, filtered file list that fits in ``max_bytes``.

    Args:
        sources: ``SOURCES`` names, in the order their files are taken.
        max_bytes: the corpus size cap.

    Returns:
        The corpus; its digest changes when any chosen file's path or content does.
    """
    corpus = Corpus(groups={name: {"files": 0, "bytes": 0} for name in sources})
    seen: set[str] = set()
    digest = hashlib.sha256()
    for name in sources:
        for path in SOURCES[name][1]():
            data, reason = _plain_text(path)
            if data is None:
                corpus.skipped[reason] = corpus.skipped.get(reason, 0) + 1
                continue
            content = hashlib.sha256(data).hexdigest()
            if content in seen:
                corpus.skipped["duplicate"] = corpus.skipped.get("duplicate", 0) + 1
                continue
            if corpus.bytes + len(data) > max_bytes:
                corpus.digest = digest.hexdigest()
                return corpus
            seen.add(content)
            digest.update(f"{path}\0{content}\n".encode())
            corpus.files.append(path)
            corpus.bytes += len(data)
            corpus.groups[name]["files"] += 1
            corpus.groups[name]["bytes"] += len(data)
    corpus.digest = digest.hexdigest()
    return corpus


def prepare_corpus(
    corpus: Corpus, data_dir: Path, prepare: dict[str, Any], workers: int
) -> tuple[Manifest, bool]:
    """Prepare ``corpus`` into ``data_dir``, or reuse what an identical call left there.

    Args:
        prepare: the settings the shards depend on (vocab, seq_len, val_docs, seed); with the
            corpus digest they decide whether ``data_dir`` can be reused.
        workers: tokenisation processes (the output does not depend on them).

    Returns:
        The manifest and whether it was reused.
    """
    key = {**prepare, "corpus_sha256": corpus.digest}
    record = data_dir / CORPUS_RECORD
    has_manifest = (data_dir / MANIFEST).is_file()
    if has_manifest and record.is_file() and json.loads(record.read_text())["settings"] == key:
        return Manifest.load(data_dir), True
    record.unlink(missing_ok=True)
    try:
        summary = prepare_dataset(
            PrepareConfig(
                inputs=[str(p) for p in corpus.files],
                output=str(data_dir),
                format="text",
                text_unit="file",
                train_bpe=prepare["vocab"],
                seq_len=prepare["seq_len"],
                samples_per_shard=prepare["samples_per_shard"],
                val_docs=prepare["val_docs"],
                seed=prepare["seed"],
                workers=workers,
                overwrite=has_manifest,  # a prepared dataset made with other settings
            )
        )
    except DataConfigError as err:
        raise SystemExit(f"prepare: {err}") from None
    print(format_summary(summary))
    files = [str(p) for p in corpus.files]
    record.write_text(json.dumps({"settings": key, **corpus.summary(), "file_list": files}) + "\n")
    return Manifest.load(data_dir), False


def corpus_report(
    corpus: Corpus, manifest: Manifest, data_dir: Path, reused: bool, settings: dict[str, Any]
) -> dict[str, Any]:
    """Corpus stats for the JSON: files, bytes, tokenizer, documents/tokens/windows per split."""
    splits = {
        s: {k: manifest.stats[s][k] for k in ("documents", "tokens", "samples")}
        for s in ("train", "val")
    }
    total = sum(s["tokens"] for s in splits.values())
    return {
        **corpus.summary(),
        "sources": {name: SOURCES[name][0] for name in corpus.groups},
        "settings": settings,
        "data_dir": str(data_dir),
        "file_list": str(data_dir / CORPUS_RECORD),
        "reused": reused,
        "vocab_size": manifest.vocab_size,
        "bytes_per_token": round(corpus.bytes / max(total, 1), 3),
        **splits,
    }


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Plan:
    """What every run shares (derived values included: one JSON object in the output)."""

    tokens: int  # asked for
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    schedule: str
    seed: int
    eval_every: int
    eval_batches: int
    shuffle_buffer: int
    device: str
    overrides: tuple[str, ...]  # --set, shared by every config

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def run_overrides(plan: Plan, data_dir: Path, vocab_size: int, run_dir: Path) -> list[str]:
    """The overrides that make every run equal: data, vocabulary, schedule, one stage."""
    source = {"name": "corpus", "path": str(data_dir.resolve()), "split": "train"}
    return [
        *plan.overrides,
        f"data.sources=[{json.dumps(source)}]",
        "data.eval_split=val",
        f"data.shuffle_buffer={plan.shuffle_buffer}",
        "curriculum.stages=[]",  # one stage, every component on
        f"model.vocab_size={vocab_size}",
        f"train.steps={plan.steps}",
        f"train.batch_size={plan.batch_size}",
        "train.grad_accum=1",
        f"train.seq_len={plan.seq_len}",
        f"train.lr={plan.lr}",
        f"train.warmup_steps={plan.warmup_steps}",
        f"train.schedule={plan.schedule}",
        f"train.seed={plan.seed}",
        f"train.eval_every={plan.eval_every}",
        f"train.eval_batches={plan.eval_batches}",
        f"train.device={plan.device}",
        f"train.log_every={plan.steps}",
        "tracking.enabled=false",
        "checkpoint.enabled=false",
        "run.plot=false",
        f"run.dir={run_dir.resolve()}",
    ]


def model_info(cfg: RunConfig, seq_len: int) -> dict[str, Any]:
    """Parameters, FLOPs per token and inference cache bytes of ``cfg``'s model, every path on
    (built on the meta device: no memory, any size)."""
    model = build_model(cfg.model, device="meta")
    model.set_active_paths(PATH_NAMES)
    params = count_parameters(model)
    flops = count_flops(model, seq_len)
    lengths = (seq_len, LONG_CONTEXT)
    caches = {n: inference_cache_bytes(model, n) for n in lengths}
    return {
        "family": cfg.model.family,
        "params": params.total,
        "active_params": params.active,
        "attention_flops_per_token": flops.components.get("attention", 0.0),
        "forward_flops_per_token": flops.forward_per_token,
        "train_flops_per_token": flops.train_per_token,
        "forward_flops_by_component": flops.components,
        # bf16 activations (the function's default), fp32 where a state is kept in fp32
        "cache_bytes": {str(n): caches[n]["total"] for n in lengths},
        "cache_bytes_by_path": {str(n): caches[n] for n in lengths},
    }


class MetricsTail:
    """New complete rows of a ``metrics.jsonl`` another process is appending to."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def poll(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a row being written stays for the next poll
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def train_one(
    config: str, overrides: list[str], run_dir: Path, env: dict[str, str], bar: tqdm
) -> tuple[int, float]:
    """Train one config in its own process (``launch.train``); advance ``bar`` per step.

    Returns:
        The exit code and the process's wall time (start-up and evaluation included).
    """
    shutil.rmtree(run_dir, ignore_errors=True)  # the trainer appends to an old metrics.jsonl
    run_dir.mkdir(parents=True)
    tail = MetricsTail(run_dir / "metrics.jsonl")
    cmd = [sys.executable, "-m", "launch.train", "--config", config, *overrides]
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = False
        while not done:
            try:
                proc.wait(timeout=0.5)
                done = True
            except subprocess.TimeoutExpired:
                pass
            for row in tail.poll():
                if "loss" in row:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {row['loss']:.3f}")
                elif "eval/loss" in row:
                    bar.set_postfix_str(f"eval {row['eval/loss']:.3f}")
    return proc.returncode, time.perf_counter() - t0


def read_results(rows: list[dict[str, float]], plan: Plan) -> dict[str, Any]:
    """Results of one run from its metrics rows: tokens, time, the eval curve, the final loss."""
    train = [r for r in rows if "loss" in r]
    tokens_at = {int(r["step"]): int(r["tokens"]) for r in train}
    curve = [
        {
            "step": int(r["step"]),
            "tokens": tokens_at[int(r["step"])],
            "loss": r["eval/loss"],
            "perplexity": math.exp(r["eval/loss"]),
        }
        for r in rows
        if "eval/loss" in r
    ]
    train_s = sum(r["step_time_s"] for r in train)
    tokens = int(train[-1]["tokens"]) if train else 0
    window = max(1, len(train) // 10)
    final = curve[-1] if curve and curve[-1]["step"] == plan.steps else None
    return {
        "steps": len(train),
        "tokens": tokens,
        "final_eval_loss": final["loss"] if final else None,
        "final_perplexity": final["perplexity"] if final else None,
        "eval_tokens": next((int(r["eval/tokens"]) for r in rows if "eval/tokens" in r), 0),
        "train_loss_last": statistics.fmean(r["loss"] for r in train[-window:]) if train else None,
        "train_s": train_s,
        "tokens_per_s": tokens / train_s if train_s else None,
        # the first step holds one-off work (allocator warm-up, kernel compilation)
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train[1:])
        if len(train) > 1
        else None,
        "curve": curve,
    }


def _log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def format_table(models: dict[str, dict[str, Any]], seq_len: int) -> str:
    """One markdown row per model: size, result, speed, attention FLOPs, cache bytes."""
    head = (
        "| model | params | tokens | eval loss | perplexity | train s | tokens/s"
        f" | attn MFLOP/tok | train MFLOP/tok | cache MiB @{seq_len} | cache MiB @{LONG_CONTEXT} |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for name, m in models.items():
        cache = m["cache_bytes"]
        cells = [
            name,
            _fmt(m["params"], ".2f", 1e6) + "M",
            f"{m.get('tokens', 0):,}",
            _fmt(m.get("final_eval_loss"), ".4f"),
            _fmt(m.get("final_perplexity"), ".2f"),
            _fmt(m.get("train_s"), ".1f"),
            _fmt(m.get("tokens_per_s"), ",.0f"),
            _fmt(m["attention_flops_per_token"], ".3f", 1e6),
            _fmt(m["train_flops_per_token"], ".2f", 1e6),
            _fmt(cache[str(seq_len)], ".3f", 2**20),
            _fmt(cache[str(LONG_CONTEXT)], ".3f", 2**20),
        ]
        if "error" in m:
            cells[3] = f"failed (rc {m['error']['returncode']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(models: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Held-out loss against training tokens, one line per model (perplexity on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in models.items():
        curve = m.get("curve") or []
        if curve:
            label = f"{name} ({m['params'] / 1e6:.1f}M): ppl {curve[-1]['perplexity']:.1f}"
            ax.plot([p["tokens"] for p in curve], [p["loss"] for p in curve], "o-", label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    right = ax.secondary_yaxis("right", functions=(np.exp, lambda p: np.log(np.maximum(p, 1e-9))))
    right.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="run configs to compare")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides for every config",
    )
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="training and shard sequence length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps")
    p.add_argument("--schedule", choices=("cosine", "wsd"), default="cosine")
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--eval-every", type=int, default=None, help="steps (default: steps // 8)")
    p.add_argument(
        "--eval-batches", type=int, default=None, help="held-out batches per eval (default: all)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per training process")
    p.add_argument(
        "--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES), help="corpus groups"
    )
    p.add_argument("--corpus-mb", type=float, default=30.0, help="corpus size cap (MB of text)")
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--val-fraction", type=float, default=0.02, help="files held out (>= 1)")
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=32,
        help="windows per shard: small, so that the reader's shard-order shuffle mixes files",
    )
    p.add_argument(
        "--shuffle-buffer", type=int, default=4096, help="data.shuffle_buffer of every run"
    )
    p.add_argument("--data-dir", default="runs/perplexity-data", help="prepared corpus cache")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="prepare")
    p.add_argument("--prepare-only", action="store_true", help="prepare the corpus, train nothing")
    p.add_argument("--work-dir", default="runs/perplexity", help="one run directory per config")
    p.add_argument("--out", default="docs/results/perplexity.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def _plan(args: argparse.Namespace, manifest: Manifest) -> Plan:
    """The shared run settings; derived values (steps, warm-up, eval cadence) are printed."""
    per_step = args.batch_size * args.seq_len
    steps = args.tokens // per_step
    if steps < 1:
        raise SystemExit(f"--tokens {args.tokens} is less than one step ({per_step} tokens)")
    val_samples = manifest.stats["val"]["samples"]
    whole = max(1, val_samples // args.batch_size)  # more would score some windows twice
    eval_batches = min(args.eval_batches or whole, whole)
    plan = Plan(
        tokens=args.tokens,
        steps=steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=steps // 10 if args.warmup_steps is None else args.warmup_steps,
        schedule=args.schedule,
        seed=args.seed,
        eval_every=args.eval_every or max(1, steps // 8),
        eval_batches=eval_batches,
        shuffle_buffer=args.shuffle_buffer,
        device=args.device,
        overrides=tuple(args.set),
    )
    print(
        f"{steps} steps x {per_step} tokens = {steps * per_step:,} tokens per model"
        f" (asked {args.tokens:,}); warm-up {plan.warmup_steps} steps; eval every"
        f" {plan.eval_every} steps on {eval_batches} batches ({eval_batches * per_step:,} of the"
        f" {val_samples * args.seq_len:,} held-out tokens)"
    )
    return plan


def _check_flags(args: argparse.Namespace) -> None:
    """Fail before any work: a --set of a key this script owns, or two configs of one name."""
    clashes = [o for o in args.set if o.split("=", 1)[0] in OWN_KEYS]
    if clashes:
        raise SystemExit(f"--set {clashes}: set by this script for every run (use its flags)")
    _names(args.configs)


def _names(configs: list[str]) -> list[str]:
    names = [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        raise SystemExit(f"--configs: file names must differ, got {names}")
    return names


def _child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _prepare(args: argparse.Namespace) -> tuple[Corpus, Manifest, dict[str, Any]]:
    corpus = select_corpus(args.sources, int(args.corpus_mb * 1e6))
    if len(corpus.files) < 2:
        raise SystemExit(f"corpus: {len(corpus.files)} file(s) within --corpus-mb; need >= 2")
    val_docs = min(len(corpus.files) - 1, max(1, round(args.val_fraction * len(corpus.files))))
    # the held-out choice has its own fixed seed: --seed changes the runs, not the split
    settings = {
        "vocab": args.vocab,
        "seq_len": args.seq_len,
        "samples_per_shard": args.samples_per_shard,
        "val_docs": val_docs,
        "seed": 0,
    }
    data_dir = Path(args.data_dir)
    manifest, reused = prepare_corpus(corpus, data_dir, settings, args.workers)
    asked = {
        "sources": args.sources,
        "corpus_mb": args.corpus_mb,
        "val_fraction": args.val_fraction,
    }
    stats = corpus_report(corpus, manifest, data_dir, reused, {**asked, **settings})
    print(
        f"corpus: {stats['files']} files, {stats['mb']} MB -> {stats['train']['tokens']:,} train /"
        f" {stats['val']['tokens']:,} val tokens ({stats['val']['documents']} held-out files),"
        f" BPE vocab {manifest.vocab_size}{' (reused ' + str(data_dir) + ')' if reused else ''}"
    )
    return corpus, manifest, stats


def run_models(
    args: argparse.Namespace, plan: Plan, manifest: Manifest
) -> dict[str, dict[str, Any]]:
    """Train and score every config; a failed run is recorded (with its log tail), not fatal."""
    names = _names(args.configs)
    data_dir, work = Path(args.data_dir), Path(args.work_dir)
    jobs = []
    for name, config in zip(names, args.configs):
        overrides = run_overrides(plan, data_dir, manifest.vocab_size, work / name)
        cfg = load_config(config, overrides)  # a bad key fails here, before any training
        jobs.append((name, str(Path(config).resolve()), overrides, model_info(cfg, plan.seq_len)))
    models: dict[str, dict[str, Any]] = {}
    env = _child_env(args.threads)
    bar = tqdm(total=plan.steps * len(jobs), unit="step", desc="perplexity runs")
    for name, config, overrides, info in jobs:
        bar.set_description(name)
        rc, wall_s = train_one(config, overrides, work / name, env, bar)
        result = read_results(read_metrics(work / name / "metrics.jsonl"), plan)
        models[name] = {"config": config, **info, **result, "wall_s": wall_s}
        models[name]["train_flops"] = info["train_flops_per_token"] * result["tokens"]
        models[name]["run_dir"] = str(work / name)
        if rc != 0 or result["final_eval_loss"] is None:
            log = work / name / "train.log"
            models[name]["error"] = {"returncode": rc, "log_tail": _log_tail(log)}
            tqdm.write(f"{name}: training failed (rc {rc}), see {log}:\n{_log_tail(log)}")
    bar.close()
    return models


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Prepare the corpus, train every config, score it; returns (and writes) the report."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    _check_flags(args)
    _, manifest, corpus = _prepare(args)
    report: dict[str, Any] = {"corpus": corpus}
    if args.prepare_only:
        return report
    plan = _plan(args, manifest)
    models = run_models(args, plan, manifest)
    report = {
        "settings": {**plan.__dict__, "tokens_per_step": plan.tokens_per_step},
        "corpus": corpus,
        "models": models,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - t0,
    }
    print(format_table(models, plan.seq_len))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = (
        f"{plan.steps} steps x {plan.batch_size} x {plan.seq_len} tokens, lr {plan.lr},"
        f" {corpus['mb']} MB corpus, BPE {corpus['vocab_size']}"
    )
    plot_curves(models, plot, title)
    print(f"wrote {out} and {plot} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    sys.exit(1 if any("error" in m for m in main().get("models", {}).values()) else 0)
