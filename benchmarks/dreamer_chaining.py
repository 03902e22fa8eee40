"""Dreamer vs matched Transformers on multi-hop chaining: accuracy against training tokens.

Run:  python benchmarks/dreamer_chaining.py --out dreamer_chaining.json          # CPU defaults
      python benchmarks/dreamer_chaining.py --device cuda --steps 2000 --batch-size 32 \\
          --seq-len 256 --eval-every 100 --eval-batches 16 --out dreamer_chaining_gpu.json
      python benchmarks/dreamer_chaining.py --model-scale tiny --steps 4    # seconds (smoke)

Models (``--model-scale 29m``, ``--models`` picks a subset):

  name                      config                           matched to dreamer-29m in
  dreamer-29m               configs/dreamer-29m.yaml         -
  transformer-29m           configs/transformer-29m.yaml     parameters
  transformer-29m-flops     configs/transformer-29m-flops.yaml   forward FLOPs/token at 1024
  transformer-29m-mem       configs/transformer-29m-mem.yaml decode cache at 1024
  hydra-29m-token           configs/hydra-29m.yaml + model.moe.routing=token
                            (the standard token MoE of the expert-diversity comparison)

``--model-scale tiny`` swaps them for configs that train in seconds on a CPU (``dreamer-tiny``,
the Transformers at d_model 64 with a 128-token vocabulary, ``hydra-tiny`` with token routing):
the plumbing of the smoke test, numbers meaningless.

Every model is trained by the real trainer (``pretrain.build.build_trainer``) with the overrides
``benchmarks/ablations.py`` uses (``run_overrides``: one curriculum stage with every component
on, tracking and checkpoints off) and exactly the same tokens: the same chaining source
(``--hops``, ``--n-symbols``, ``--n-distractors``), steps, batch, sequence length, LR schedule
and seed (the seed also sets each model's init). A SHA-256 of every training batch's input ids
is kept per model, and the report says whether they are all equal.

Every ``--eval-every`` steps (and before the first step) the model is scored by
``pretrain.eval.evaluate_tasks`` on held-out rows (``heldout_seed``: rows no training step
reads; the same rows for every model and every point): answer accuracy at each proof length
(``chaining_h2``, ``chaining_h3``, ``chaining_h5``), and overall (answer-weighted). Tokens to
``--threshold`` is the first evaluation point at which the overall accuracy reaches it (its
resolution is ``--eval-every`` steps), or "not reached".

Expert-selection diversity (every model with MoE modules, ``pretrain.metrics.moe_layers``): after
training, ``--diversity-batches`` held-out batches of the training mixture run through the model
in train mode under ``torch.no_grad`` (the MoE modules record their choices only in training
mode; nothing is stepped), and each module's ``selection_metrics()`` is averaged over the
batches. ``set_entropy_bits`` is the entropy of the chosen k-expert *sets* over the batch's
tokens (padding included), per depth r of Dreamer's looped expert attention
(``depth{r}/set_entropy_bits``), per MoE layer of the token-routed Hydra; ``set_entropy_max_bits``
is log2 C(E, k) (every set equally used), and the normalised value is bits / max bits.
Dreamer's ``distinct_experts_per_token`` is the mean number of different experts one token uses
over the R depths (k if it picks the same set at every depth, at most min(E, R k)); for
reference, R independent uniform choices would give E (1 - (1 - k/E)^R). The same measures of
the untrained model (the same init) are reported beside them.

Output: a table, ``--out`` JSON (settings, per model: parameters, FLOPs per token at
``--seq-len`` and at 1024, decode cache, the token digest, the accuracy curve, tokens to the
threshold, diversity; rewritten after every model) and a PNG (``--plot``, default ``--out`` with
``.png``): accuracy against training tokens, overall and per proof length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks._figures import save_figure  # noqa: E402
from benchmarks.ablations import AblationTask, Settings, run_overrides  # noqa: E402
from benchmarks.perplexity import model_info  # noqa: E402
from parallel.dist import init_distributed, shutdown  # noqa: E402
from pretrain.build import build_trainer, build_training_model  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.eval import TaskSpec, evaluate_tasks, heldout_seed, resolve_task_specs  # noqa: E402
from pretrain.eval.tasks import task_batches  # noqa: E402
from pretrain.flops import count_flops  # noqa: E402
from pretrain.metrics import moe_layers  # noqa: E402
from pretrain.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MATCH_SEQ_LEN = 1024  # the sequence length the Transformers are FLOP- and cache-matched at
EVAL_HOPS = (2, 3, 5)  # proof lengths ``pretrain.eval.EVAL_TASKS`` scores separately


@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison: its config, overrides and what it is matched in."""

    name: str
    config: str  # relative to the repository root
    overrides: tuple[str, ...] = ()
    matched: str = "-"


TINY_TRANSFORMER = ("model.vocab_size=128", "model.d_model=64", "model.attention.n_heads=4",
                    "model.d_ff=160", "model.max_seq_len=1024")  # fmt: skip
TOKEN_MOE = ("model.moe.routing=token",)
MODELS: dict[str, tuple[ModelSpec, ...]] = {
    "29m": (
        ModelSpec("dreamer-29m", "configs/dreamer-29m.yaml"),
        ModelSpec("transformer-29m", "configs/transformer-29m.yaml", matched="parameters"),
        ModelSpec("transformer-29m-flops", "configs/transformer-29m-flops.yaml", matched="FLOPs"),
        ModelSpec("transformer-29m-mem", "configs/transformer-29m-mem.yaml", matched="cache"),
        ModelSpec("hydra-29m-token", "configs/hydra-29m.yaml", TOKEN_MOE, "token MoE"),
    ),
    "tiny": (
        ModelSpec("dreamer-tiny", "configs/dreamer-tiny.yaml"),
        ModelSpec("transformer-tiny", "configs/transformer-29m.yaml", TINY_TRANSFORMER, "-"),
        ModelSpec(
            "transformer-tiny-flops", "configs/transformer-29m-flops.yaml", TINY_TRANSFORMER, "-"
        ),
        ModelSpec(
            "transformer-tiny-mem", "configs/transformer-29m-mem.yaml", TINY_TRANSFORMER, "-"
        ),
        ModelSpec("hydra-tiny-token", "configs/hydra-tiny.yaml", TOKEN_MOE, "token MoE"),
    ),
}


@dataclass
class ChainSettings(Settings):
    """What every run shares. The ``Settings`` fields of ``benchmarks/ablations.py`` (whose
    ``run_overrides`` makes the runs), with ``scale`` 1 (no size multiplier: ``model_scale``
    names the model set) and ``base_config`` the Dreamer config; then this benchmark's own."""

    model_scale: str = "29m"
    seed: int = 0
    eval_every: int = 0
    threshold: float = 0.5
    hops: list[int] = field(default_factory=lambda: [2, 3])
    n_symbols: int = 32
    n_distractors: int = 2
    diversity_batches: int = 4

    def task(self) -> AblationTask:
        """The chaining training source and the per-proof-length scoring."""
        args = {"hops": self.hops, "n_symbols": self.n_symbols, "n_distractors": self.n_distractors}
        evals = tuple(f"chaining_h{h}" for h in self.hops)
        return AblationTask("chaining", "depth", {"task": "chaining", "task_args": args}, evals)


# ----------------------------------------------------------------------------- one run


def model_config(s: ChainSettings, spec: ModelSpec, run_dir: Path) -> RunConfig:
    """``spec``'s config with the shared run overrides (the same tokens for every model)."""
    overrides = [*spec.overrides, *run_overrides(s, s.task(), s.seed, run_dir), "run.plot=false"]
    return load_config(ROOT / spec.config, overrides)


def describe(cfg: RunConfig, seq_len: int) -> dict[str, Any]:
    """Parameters, FLOPs per token (at ``seq_len`` and at 1024) and decode cache of ``cfg``."""
    info = model_info(cfg, seq_len)
    model = build_model(cfg.model, device="meta")
    info["forward_flops_per_token_at_1024"] = count_flops(model, MATCH_SEQ_LEN).forward_per_token
    info["n_layers"] = cfg.model.n_layers
    info["d_model"] = cfg.model.d_model
    return info


def overall(scores: dict[str, dict[str, Any]]) -> float:
    """Answer-weighted accuracy over the proof lengths."""
    answers = sum(row.get("answers", 0.0) for row in scores.values())
    hits = sum(row.get("accuracy", 0.0) * row.get("answers", 0.0) for row in scores.values())
    return hits / answers if answers else math.nan


def curve_point(step: int, tokens: int, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "step": step,
        "tokens": tokens,
        "accuracy": overall(scores),
        **{name: row.get("accuracy") for name, row in scores.items()},
        "loss": statistics.fmean(row["loss"] for row in scores.values()),
        "answers": sum(int(row.get("answers", 0)) for row in scores.values()),
    }


def heldout_rows(
    cfg: RunConfig, s: ChainSettings, batches: int
) -> Iterable[dict[str, torch.Tensor]]:
    """Held-out batches of the training mixture (every proof length), the seed scoring uses."""
    task = s.task()
    spec = TaskSpec("chaining", "chaining", dict(task.source["task_args"]))
    return task_batches(
        spec, cfg.model.vocab_size, s.seq_len, batches, s.batch_size, heldout_seed(cfg)
    )


@torch.no_grad()
def selection_diversity(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, dict[str, float]]:
    """Per MoE module (``moe_layers`` key): its ``selection_metrics()`` averaged over
    ``batches``, each run in train mode (the modules record their choices only then) under
    no_grad. Per-expert load fractions (of the last optimizer step) are left out."""
    modules = moe_layers(model)
    if not modules:
        return {}
    was_training = model.training
    model.train()
    values: dict[str, dict[str, list[float]]] = {layer: {} for layer in modules}
    try:
        for batch in batches:
            model(batch["input_ids"].to(device), seq_idx=batch["seq_idx"].to(device))
            for layer, moe in modules.items():
                for key, value in moe.selection_metrics().items():
                    if "/expert" not in key:
                        values[layer].setdefault(key, []).append(float(value))
    finally:
        model.train(was_training)
    out = {}
    for layer, metrics in values.items():
        row = {key: statistics.fmean(v) for key, v in metrics.items()}
        top = row.get("set_entropy_max_bits")
        for key in list(row):
            if key.endswith("set_entropy_bits") and top:
                row[key.removesuffix("set_entropy_bits") + "set_entropy_norm"] = row[key] / top
        moe = modules[layer]
        row["n_experts"], row["top_k"] = moe.cfg.n_experts, moe.cfg.top_k
        out[layer] = row
    return out


def uniform_distinct_experts(n_experts: int, top_k: int, depths: int) -> float:
    """Expected distinct experts of one token over ``depths`` independent uniform k-sets."""
    return n_experts * (1 - (1 - top_k / n_experts) ** depths)


def train_with_curve(cfg: RunConfig, s: ChainSettings, bar: tqdm | None = None) -> dict[str, Any]:
    """Train ``cfg`` with the real trainer, scoring the held-out chaining rows every
    ``s.eval_every`` steps (and at step 0 and the last step); then the selection diversity.

    The trainer's own ``_maybe_evaluate`` (called once after every step; ``train.eval_every``
    is 0 here, so it does nothing) is replaced on this instance by the scoring, and its
    ``_micro_batches`` is wrapped to hash the training input ids; the loop itself is the real one.
    """
    info = init_distributed(cfg.train.device)
    try:
        device = info.device
        specs, skipped = resolve_task_specs(list(s.task().eval_tasks), cfg, cfg.model.vocab_size,
                                            s.seq_len)  # fmt: skip
        if skipped:
            raise SystemExit(f"cannot score {skipped}")
        seed = heldout_seed(cfg)
        # the untrained model's selection diversity, on a separate copy of the same init
        init_model = build_training_model(cfg, info)
        init_diversity = selection_diversity(
            init_model, heldout_rows(cfg, s, s.diversity_batches), device
        )
        del init_model
        trainer = build_trainer(cfg, info, tracker_factory=None, log=lambda message: None)
        curve: list[dict[str, Any]] = []
        eval_s = 0.0

        def score() -> None:
            nonlocal eval_s
            t0 = time.perf_counter()
            scores = evaluate_tasks(
                trainer.model, specs, s.seq_len, s.eval_batches, device,
                batch_size=s.batch_size, seed=seed,
            )  # fmt: skip
            eval_s += time.perf_counter() - t0
            curve.append(curve_point(trainer.state.step, trainer.state.tokens, scores))

        def after_step() -> None:
            step = trainer.state.step
            if bar is not None:
                bar.update(1)
            if step == s.steps or (s.eval_every and step % s.eval_every == 0):
                score()
                if bar is not None:
                    bar.set_postfix_str(f"step {step}: acc {curve[-1]['accuracy']:.3f}")

        digest = hashlib.sha256()
        next_micro_batches = trainer._micro_batches

        def hashed_micro_batches() -> list[dict[str, torch.Tensor]]:
            micro = next_micro_batches()
            for batch in micro:
                digest.update(batch["input_ids"].cpu().numpy().tobytes())
            return micro

        trainer._maybe_evaluate = after_step
        trainer._micro_batches = hashed_micro_batches
        score()  # step 0: the untrained model
        eval_before, t0 = eval_s, time.perf_counter()
        history = trainer.run()
        train_s = time.perf_counter() - t0 - (eval_s - eval_before)  # scoring time left out
        diversity = selection_diversity(
            trainer.model, heldout_rows(cfg, s, s.diversity_batches), device
        )
    finally:
        shutdown(info)
    losses = [row["loss"] for row in history if "loss" in row]
    window = max(1, len(losses) // 10)
    return {
        "tokens": trainer.state.tokens,
        "steps": trainer.state.step,
        "train_tokens_sha256": digest.hexdigest(),
        "train_s": train_s,
        "eval_s": eval_s,
        "loss_first": statistics.fmean(losses[:window]) if losses else None,
        "loss_last": statistics.fmean(losses[-window:]) if losses else None,
        "curve": curve,
        "final": curve[-1],
        "diversity": diversity,
        "diversity_init": init_diversity,
    }


# ----------------------------------------------------------------------------- results


def tokens_to_threshold(curve: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """Training tokens at the first evaluation point where ``key`` >= ``threshold`` (None: never)."""
    for point in curve:
        value = point.get(key)
        if value is not None and value >= threshold:
            return int(point["tokens"])
    return None


def chance_levels(s: ChainSettings) -> dict[str, float]:
    """Two reference accuracies: a uniform guess among the symbols, and a uniform guess among
    the chain ends (entities that start no premise: one per chain), which needs no chaining."""
    return {"uniform_symbol": 1 / s.n_symbols, "uniform_chain_end": 1 / (1 + s.n_distractors)}


def _fmt_tokens(tokens: int | None) -> str:
    return "not reached" if tokens is None else f"{tokens:,}"


def format_table(models: dict[str, dict[str, Any]], s: ChainSettings) -> str:
    """Final accuracy (overall, per proof length) and tokens to the threshold, per model."""
    hops = [f"chaining_h{h}" for h in s.hops]
    head = ["model", "params", "fwd FLOPs/tok@1024", "matched", "acc", *[h[9:] for h in hops],
            f"tokens to {s.threshold:g}", "loss last", "train s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        f = m["final"]
        cells = [name, f"{m['params'] / 1e6:.2f}M", f"{m['forward_flops_per_token_at_1024'] / 1e6:.1f}M",
                 m["matched"], f"{f['accuracy']:.3f}", *[f"{f[h]:.3f}" for h in hops],
                 _fmt_tokens(m["tokens_to_threshold"]), f"{m['loss_last']:.3f}",
                 f"{m['train_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diversity_rows(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, routing layer / depth): raw and normalised set entropy, trained and
    at init; Dreamer's distinct experts per token on its layer's row."""
    rows = []
    for name, m in models.items():
        for layer, d in m.get("diversity", {}).items():
            init = m.get("diversity_init", {}).get(layer, {})
            keys = sorted(k for k in d if k.endswith("set_entropy_bits"))
            for key in keys:
                where = key.removesuffix("set_entropy_bits").rstrip("/") or "-"
                rows.append({
                    "model": name,
                    "layer": layer,
                    "depth": where,
                    "experts": f"{d['top_k']} of {d['n_experts']}",
                    "bits": d[key],
                    "max_bits": d["set_entropy_max_bits"],
                    "norm": d[key] / d["set_entropy_max_bits"],
                    "init_norm": init.get(key, math.nan) / d["set_entropy_max_bits"],
                })  # fmt: skip
    return rows


def format_diversity(models: dict[str, dict[str, Any]]) -> str:
    rows = diversity_rows(models)
    if not rows:
        return "(no MoE modules)"
    head = ["model", "layer", "depth", "k of E", "set entropy bits", "max bits", "normalised",
            "normalised at init"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["layer"], r["depth"], r["experts"], f"{r['bits']:.3f}",
                 f"{r['max_bits']:.3f}", f"{r['norm']:.3f}", f"{r['init_norm']:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for name, m in models.items():
        for layer, d in m.get("diversity", {}).items():
            if "distinct_experts_per_token" in d:
                init = m["diversity_init"].get(layer, {}).get("distinct_experts_per_token")
                lines.append(
                    f"\n{name} L{layer}: distinct experts per token over R={d['depths']} depths"
                    f" {d['distinct_experts_per_token']:.3f} (init {init:.3f}; range"
                    f" {d['top_k']}..{min(d['n_experts'], d['depths'] * d['top_k'])}, independent"
                    f" uniform choices {d['uniform_distinct_experts']:.3f})"
                )
    return "\n".join(lines)


def plot_curves(
    models: dict[str, dict[str, Any]], s: ChainSettings, path: Path, title: str
) -> None:
    """Held-out answer accuracy against training tokens: overall, then per proof length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["accuracy", *[f"chaining_h{h}" for h in s.hops]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6), squeeze=False)
    chance = chance_levels(s)
    for ax, key in zip(axes.flat, keys):
        for i, (name, m) in enumerate(models.items()):
            curve = m["curve"]
            ax.plot([p["tokens"] for p in curve], [p[key] for p in curve], "o-", ms=3,
                    color=f"C{i}", label=name)  # fmt: skip
        ax.axhline(s.threshold, color="k", ls="--", lw=0.8, label=f"threshold {s.threshold:g}")
        ax.axhline(chance["uniform_chain_end"], color="grey", ls=":", lw=0.8,
                   label="guess a chain end")  # fmt: skip
        ax.axhline(chance["uniform_symbol"], color="grey", ls="-.", lw=0.8, label="guess a symbol")
        ax.set_title("all proof lengths" if key == "accuracy" else key.replace("_h", ", hops "),
                     fontsize=10)  # fmt: skip
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out answer accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-scale", choices=list(MODELS), default="29m", help="the model set")
    p.add_argument("--models", nargs="+", default=None, help="a subset of the set's names")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="data order and init, the same for all")
    p.add_argument("--eval-every", type=int, default=None, help="steps (default steps // 8)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per proof length")
    p.add_argument("--diversity-batches", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.5, help="overall accuracy to reach")
    p.add_argument("--hops", type=int, nargs="+", choices=EVAL_HOPS, default=[2, 3])
    p.add_argument("--n-symbols", type=int, default=32)
    p.add_argument("--n-distractors", type=int, default=2)
    p.add_argument("--labels", choices=("all", "answers"), default="all",
                   help="loss on every token (default) or on the answer tokens only")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--model", nargs="*", default=[], help="extra overrides for every model")
    p.add_argument("--work-dir", default=None, help="keep run directories here (default: temp)")
    p.add_argument("--out", default="dreamer_chaining.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> ChainSettings:
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    return ChainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        scale=1,
        eval_batches=args.eval_batches,
        device=args.device,
        base_config=MODELS[args.model_scale][0].config,
        labels=args.labels,
        model_overrides=list(args.model),
        model_scale=args.model_scale,
        seed=args.seed,
        eval_every=args.eval_every or max(1, args.steps // 8),
        threshold=args.threshold,
        hops=sorted(set(args.hops)),
        n_symbols=args.n_symbols,
        n_distractors=args.n_distractors,
        diversity_batches=args.diversity_batches,
    )


def _chosen(args: argparse.Namespace) -> list[ModelSpec]:
    specs = {m.name: m for m in MODELS[args.model_scale]}
    names = args.models or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"--models {unknown}: not in the {args.model_scale} set {list(specs)}")
    return [specs[n] for n in names]


def _finish_diversity(model: dict[str, Any]) -> None:
    """Add R and the independent-uniform reference to a looped layer's diversity rows."""
    for key in ("diversity", "diversity_init"):
        for d in model.get(key, {}).values():
            depths = sum(1 for k in d if k.endswith("/set_entropy_bits"))
            if depths:
                d["depths"] = depths
                d["uniform_distinct_experts"] = uniform_distinct_experts(
                    d["n_experts"], d["top_k"], depths
                )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and score every model; returns (and writes, after every model) the report."""
    args = parse_args(argv)
    s = _settings(args)
    chosen = _chosen(args)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dreamer-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs = {m.name: model_config(s, m, work / m.name) for m in chosen}  # bad keys fail here
    for name, cfg in configs.items():
        info = describe(cfg, s.seq_len)
        print(f"  {name:<24}{info['params']:>12,} params  {info['forward_flops_per_token_at_1024'] / 1e6:8.1f}M"
              f" fwd FLOPs/token at 1024  ({cfg.model.family})")  # fmt: skip
    report: dict[str, Any] = {
        "settings": s.__dict__,
        "task": s.task().__dict__,
        "chance": chance_levels(s),
        "torch": torch.__version__,
        "models": {},
    }
    t0 = time.perf_counter()
    bar = tqdm(total=s.steps * len(chosen), unit="step", desc="dreamer chaining")
    try:
        for spec in chosen:
            cfg = configs[spec.name]
            bar.set_description(spec.name)
            result = train_with_curve(cfg, s, bar)
            model = {
                "config": spec.config,
                "overrides": list(spec.overrides),
                "matched": spec.matched,
                **describe(cfg, s.seq_len),
                **result,
            }
            model["tokens_to_threshold"] = tokens_to_threshold(
                result["curve"], "accuracy", s.threshold
            )
            model["tokens_to_threshold_by_hops"] = {
                f"chaining_h{h}": tokens_to_threshold(
                    result["curve"], f"chaining_h{h}", s.threshold
                )
                for h in s.hops
            }
            _finish_diversity(model)
            report["models"][spec.name] = model
            digests = {m["train_tokens_sha256"] for m in report["models"].values()}
            report["same_training_tokens"] = len(digests) == 1
            report["wall_s"] = time.perf_counter() - t0
            out.write_text(json.dumps(report, indent=1) + "\n")  # partial results survive
    finally:
        bar.close()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t0
    models = report["models"]
    print(format_table(models, s))
    print(format_diversity(models))
    print(f"same training tokens for every model: {report['same_training_tokens']}")
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = (
        f"chaining hops {s.hops}, {s.n_symbols} symbols, {s.n_distractors} distractor chains:"
        f" {s.steps} steps x {s.batch_size} x {s.seq_len} tokens, lr {s.lr}, seed {s.seed}"
    )
    plot_curves(models, s, plot, title)
    print(f"wrote {out} and {plot} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
