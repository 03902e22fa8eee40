"""Ablations of the Hydra components: train small models with one component removed, score them.

Run:  python benchmarks/ablations.py --out ablations.json                 # CPU defaults
      python benchmarks/ablations.py --tasks chaining --seeds 5 --steps 300 --lr 1e-2 \
          --labels answers --jobs 2       # docs/results/ablations.md: 2 runs at a time
      python benchmarks/ablations.py --tasks fact_lookup --seeds 5 --all-variants
      python benchmarks/ablations.py --scale 4 --device cuda --out ablations_gpu.json

Each task probes the component that should matter most for it:

  task              component   trained on                    scored by
  distant_premise   attention   facts, filler, a question     answer accuracy
  domain_mixture    moe         4 domains, own token maps     answer accuracy and I(domain; expert)
  fact_lookup       pkm         a fixed table of facts        answer accuracy
  chaining          workspace   proof lengths 1, 1, 2 mixed   answer accuracy at 1, 2, 3, 5 separately

Variants: ``full`` (every component), ``no_attention``, ``no_moe`` (a dense FFN instead),
``no_workspace``, ``no_pkm`` (each a config override ``model.<component>.enabled=false``, so the
removed component has no parameters and costs nothing), and two other families as baselines:
``transformer`` (Llama-style) and ``attamba`` (SSM keys/values, attention over chunk boundaries
plus a leading window), each with its ``d_ff`` chosen so that its parameter count is the closest
to ``full``'s; the counts are printed. By default each task trains ``full``, the variant without
its component and both baselines; ``--all-variants`` trains all seven on every task.

Every run goes through the real trainer (``pretrain.build.build_trainer``): one curriculum stage
with all of the variant's components on, tracking and checkpoints off, the same steps, batch and
sequence length (so the same tokens) for every variant. Seeds set the model init and the data
order; scoring uses ``pretrain.eval.evaluate_tasks`` on held-out rows (a seed training never
reads). Results are the mean over ``--seeds`` seeds with a 95% t-interval (mean ± t_{0.975,n-1}
* s / sqrt(n), s the sample standard deviation; the std is kept in the JSON too).

``--jobs 2`` runs two runs at a time, each in a fresh interpreter (the script with ``--run-job``)
with this process's torch thread count; every run is seeded on its own, so the results are those
of ``--jobs 1`` (in-process, one after the other). ``--variants`` trains only some of the planned
variants and ``--task-args TASK=JSON`` overrides a task's settings (e.g. for a GPU run at scale).

``--scale s`` multiplies d_model, d_ff, the expert width, the attention heads (head size stays 16),
the number of layers (memories keep their relative depth) and the steps by s: 1 is the CPU size
(~0.4M parameters); 4 (~22M parameters) is meant for a GPU.

Output: a table (task metric x variant, mean ± 95% CI half-width), ``--out`` JSON (settings,
parameter counts, every run with its first/last training loss and scores, the summary with mean,
std, ci95, n and the values) and a PNG bar chart with 95% CI error bars (``--plot``, default:
``--out`` with ``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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
from parallel.dist import init_distributed, shutdown  # noqa: E402
from pretrain.build import build_trainer  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.eval import evaluate_tasks, heldout_seed, resolve_task_specs  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.params import count_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "hydra-tiny.yaml"


@dataclass(frozen=True)
class AblationTask:
    """A training task, the component it probes and how it is scored."""

    name: str
    component: str  # the Hydra component the task is meant to need
    source: dict[str, Any]  # the training data source (``data.sources`` entry)
    eval_tasks: tuple[str, ...]  # ``pretrain.eval.EVAL_TASKS`` names scored after training
    metrics: tuple[str, ...] = ("accuracy",)  # keys of each eval task's result shown


TASKS: dict[str, AblationTask] = {
    t.name: t
    for t in (
        AblationTask(
            "distant_premise",
            "attention",
            # Sized to what a CPU budget learns (docs/results/ablations.md): 2 facts of 16 symbols,
            # 8 filler tokens. 48 filler tokens (past the 32-token window) of 32 symbols stayed
            # at chance for every model; the GPU run can raise them with --task-args.
            {
                "task": "distant_premise",
                "task_args": {"n_facts": 2, "distance": 8, "n_symbols": 16},
            },
            ("distant_premise",),
        ),
        AblationTask(
            "domain_mixture",
            "moe",
            {"task": "domain_mixture", "task_args": {"n_domains": 4, "n_symbols": 64}},
            ("domain_mixture",),
            ("accuracy", "expert_mi_bits"),
        ),
        AblationTask(
            "fact_lookup",
            "pkm",
            # 384 facts: 128 were all memorised within 200 steps, which leaves nothing to compare
            {"task": "fact_lookup", "task_args": {"n_facts": 384, "n_symbols": 112}},
            ("fact_lookup",),
        ),
        AblationTask(
            "chaining",
            "workspace",
            # 1-hop proofs twice as often as 2-hop ones (a listed length repeats to weight it),
            # 1 distractor chain, 16 symbols: training on 2, 3, 5 of 32 symbols stayed at chance
            {
                "task": "chaining",
                "task_args": {"hops": [1, 1, 2], "n_distractors": 1, "n_symbols": 16},
            },
            ("chaining_h1", "chaining_h2", "chaining_h3", "chaining_h5"),
        ),
    )
}

COMPONENTS = ("attention", "moe", "workspace", "pkm")
# Other families, sized to the full Hydra by d_ff (and layers): the overrides that make each.
BASELINES: dict[str, tuple[str, ...]] = {
    "transformer": ("model.family=transformer",),
    "attamba": (
        "model.family=attamba",
        "model.ssm.expand=1",
        "model.attamba={chunk_size: 4, leading_tokens: 8, chunking: cyclic}",
    ),
}
VARIANTS = ("full", *(f"no_{c}" for c in COMPONENTS), *BASELINES)


@dataclass
class Settings:
    """What every run shares (one JSON object in the output)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    scale: int
    eval_batches: int
    device: str
    base_config: str
    labels: str = "all"  # data source labels: loss on every token, or on the answer tokens only
    model_overrides: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- configs


def scale_overrides(scale: int, config: str | Path = BASE_CONFIG) -> list[str]:
    """Model overrides of ``--scale`` on top of ``config`` (see the module docstring)."""
    if scale < 1:
        raise SystemExit(f"--scale must be >= 1, got {scale}")
    if scale == 1:
        return []
    base = load_config(config).model

    def deeper(blocks: list[int]) -> str:
        # block b of L sits at the same relative depth among L * scale blocks
        return "[" + ",".join(str((b + 1) * scale - 1) for b in blocks) + "]"

    return [
        f"model.d_model={base.d_model * scale}",
        f"model.n_layers={base.n_layers * scale}",
        f"model.d_ff={base.d_ff * scale}",
        f"model.moe.d_expert={base.moe.d_expert * scale}",
        f"model.attention.n_heads={base.attention.n_heads * scale}",
        f"model.workspace.after_blocks={deeper(base.workspace.after_blocks)}",
        f"model.pkm.after_blocks={deeper(base.pkm.after_blocks)}",
    ]


def run_overrides(s: Settings, task: AblationTask, seed: int, run_dir: Path) -> list[str]:
    """Overrides shared by every variant of one (task, seed) run."""
    source = {"name": task.name, **task.source, "labels": s.labels}
    return [
        *s.model_overrides,
        f"data.sources=[{json.dumps(source)}]",
        "curriculum.stages=[]",  # one stage, every component of the variant on
        "tracking.enabled=false",
        "checkpoint.enabled=false",
        f"train.steps={s.steps}",
        f"train.batch_size={s.batch_size}",
        f"train.seq_len={s.seq_len}",
        f"train.lr={s.lr}",
        f"train.warmup_steps={s.warmup_steps}",
        f"train.seed={seed}",
        f"train.device={s.device}",
        "train.eval_every=0",
        f"train.log_every={s.steps}",
        f"run.dir={run_dir}",
    ]


def count_params(cfg: RunConfig) -> int:
    """Total parameters of ``cfg``'s model (built on the meta device: no memory)."""
    return count_parameters(build_model(cfg.model, device="meta")).total


def size_baseline(s: Settings, family: str) -> tuple[list[str], int, int]:
    """Overrides of baseline ``family`` (``BASELINES``) whose total parameters are closest to the
    full Hydra's.

    Same d_model, vocabulary and heads; ``d_ff`` (multiples of 16) and, when even the widest FFN
    is too small, more layers make up the difference.

    Returns:
        (overrides, baseline params, full Hydra params).
    """
    hydra = count_params(load_config(s.base_config, s.model_overrides))
    base = load_config(s.base_config, s.model_overrides).model
    best: tuple[float, list[str], int] | None = None
    for n_layers in range(base.n_layers, 4 * base.n_layers + 1):
        for d_ff in range(16, 16 * base.d_model + 1, 16):
            overrides = [
                *BASELINES[family],
                f"model.n_layers={n_layers}",
                f"model.d_ff={d_ff}",
            ]
            params = count_params(load_config(s.base_config, [*s.model_overrides, *overrides]))
            error = abs(params - hydra) / hydra
            if best is None or error < best[0]:
                best = (error, overrides, params)
            if params > hydra:
                break  # wider only gets further away
        if best[0] < 0.02:
            break
    return best[1], best[2], hydra


def variant_overrides(variant: str, baselines: dict[str, list[str]]) -> list[str]:
    """The config overrides that make ``variant`` (a baseline family: its sized overrides)."""
    if variant == "full":
        return []
    if variant in baselines:
        return baselines[variant]
    return [f"model.{variant.removeprefix('no_')}.enabled=false"]


def plan_runs(
    tasks: list[str], all_variants: bool, only: list[str] | None = None
) -> list[tuple[str, str]]:
    """(task, variant) pairs: every variant, or full / no_<component> / baselines per task;
    ``only`` keeps just those variants (in ``VARIANTS`` order)."""
    pairs = []
    for name in tasks:
        relevant = ("full", f"no_{TASKS[name].component}", *BASELINES)
        chosen = VARIANTS if all_variants else relevant
        pairs += [(name, v) for v in chosen if only is None or v in only]
    return pairs


def with_task_args(task: AblationTask, extra: dict[str, Any]) -> AblationTask:
    """``task`` with ``extra`` merged over its data source's ``task_args`` (``--task-args``)."""
    if not extra:
        return task
    source = {**task.source, "task_args": {**task.source["task_args"], **extra}}
    return AblationTask(task.name, task.component, source, task.eval_tasks, task.metrics)


# ----------------------------------------------------------------------------- one run


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def train_and_score(cfg: RunConfig, task: AblationTask, eval_batches: int) -> dict[str, Any]:
    """Train ``cfg`` with the real trainer, then score the task's eval tasks on held-out rows."""
    info = init_distributed(cfg.train.device)
    try:
        trainer = build_trainer(cfg, info, tracker_factory=None, log=lambda message: None)
        t0 = time.perf_counter()
        history = trainer.run()
        train_s = time.perf_counter() - t0
        vocab, seq_len = cfg.model.vocab_size, cfg.train.seq_len
        specs, skipped = resolve_task_specs(list(task.eval_tasks), cfg, vocab, seq_len)
        if skipped:
            raise SystemExit(f"task {task.name}: cannot score {skipped}")
        scores = evaluate_tasks(
            trainer.model, specs, seq_len, eval_batches, info.device,
            batch_size=cfg.train.batch_size, seed=heldout_seed(cfg),
        )  # fmt: skip
    finally:
        shutdown(info)
    losses = [row["loss"] for row in history if "loss" in row]
    window = max(1, len(losses) // 10)  # first/last 10% of the steps, to smooth the noise
    return {
        "tokens": trainer.state.tokens,
        "train_s": train_s,
        "loss_first": _mean(losses[:window]),
        "loss_last": _mean(losses[-window:]),
        "scores": {name: {m: row.get(m) for m in task.metrics} for name, row in scores.items()},
    }


# ----------------------------------------------------------------------------- results


# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975} with ``df`` degrees of freedom: the table up to 30, then the Cornish-Fisher
    expansion around the normal quantile (error < 1e-4 there), so no scipy is needed."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def ci95_halfwidth(values: list[float]) -> float | None:
    """Half-width of the 95% t-interval of the mean of ``values`` (None below two values)."""
    if len(values) < 2:
        return None
    return t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """ "<eval task> <metric>" -> variant -> {mean, std (sample; 0 for one seed), ci95 (half-width
    of the 95% t-interval over seeds; None for one seed), n, values}."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for name, metrics in run["scores"].items():
            for metric, value in metrics.items():
                per_variant = values.setdefault(f"{name} {metric}", {})
                cell = per_variant.setdefault(run["variant"], [])
                if value is not None:  # e.g. no expert information without MoE layers
                    cell.append(float(value))
    return {
        label: {
            variant: {
                "mean": statistics.fmean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "ci95": ci95_halfwidth(vals),
                "n": len(vals),
                "values": vals,
            }
            for variant, vals in per_variant.items()
        }
        for label, per_variant in values.items()
    }


def format_table(summary: dict[str, dict[str, dict[str, Any]]], variants: list[str]) -> str:
    """Task metric x variant, ``mean ± 95% CI half-width`` (``mean`` alone for one seed);
    ``-`` not trained, ``n/a`` not measurable."""
    width = max(len(label) for label in summary) + 2
    lines = [f"{'task metric':<{width}}" + "".join(f"{v:>18}" for v in variants)]
    for label, per_variant in summary.items():
        cells = []
        for variant in variants:
            cell = per_variant.get(variant)
            if cell is None:
                cells.append("-")
            elif cell["mean"] is None:
                cells.append("n/a")
            elif cell["ci95"] is None:
                cells.append(f"{cell['mean']:.3f}")
            else:
                cells.append(f"{cell['mean']:.3f} ± {cell['ci95']:.3f}")
        lines.append(f"{label:<{width}}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def plot_summary(
    summary: dict[str, dict[str, dict[str, Any]]], variants: list[str], path: Path, title: str
) -> None:
    """One bar chart per task metric: a bar per variant, error bars the 95% t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(VARIANTS)}
    for ax, (label, per_variant) in zip(axes.flat, summary.items()):
        shown = [v for v in variants if v in per_variant and per_variant[v]["mean"] is not None]
        means = [per_variant[v]["mean"] for v in shown]
        cis = [per_variant[v]["ci95"] or 0.0 for v in shown]
        ax.bar(range(len(shown)), means, yerr=cis, capsize=4, color=[colors[v] for v in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per (task, variant)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 200 * scale)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--scale", type=int, default=1, help="model size and steps multiplier")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per eval task")
    p.add_argument("--all-variants", action="store_true", help="every variant on every task")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="train only these variants (of those planned per task)",
    )
    p.add_argument(
        "--task-args",
        action="append",
        default=[],
        metavar="TASK=JSON",
        help="override task settings, e.g. chaining='{\"hops\": [1, 2]}' (repeatable)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (1: in this process)",
    )
    p.add_argument(
        "--labels",
        choices=("all", "answers"),
        default="all",
        help="train on every token (default) or on the answer tokens only (data source labels)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--config", default=str(BASE_CONFIG), help="base run config (tiny Hydra)")
    p.add_argument("--model", nargs="*", default=[], help="extra model overrides, model.x=y")
    p.add_argument("--work-dir", default=None, help="keep run directories here (default: temp)")
    p.add_argument("--out", default="ablations.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    return Settings(
        steps=args.steps or 200 * args.scale,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        scale=args.scale,
        eval_batches=args.eval_batches,
        device=args.device,
        base_config=args.config,
        labels=args.labels,
        model_overrides=[*scale_overrides(args.scale, args.config), *args.model],
    )


def _variant_info(s: Settings, variants: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: its overrides, how the component is removed and its parameter count."""
    baselines = {}
    for family in BASELINES:
        if family not in variants:
            continue
        baselines[family], b_params, h_params = size_baseline(s, family)
        print(
            f"params: full hydra {h_params:,}, {family} {b_params:,} ({b_params / h_params - 1:+.1%})"
        )
    info = {}
    for variant in variants:
        overrides = variant_overrides(variant, baselines)
        params = count_params(load_config(s.base_config, [*s.model_overrides, *overrides]))
        how = "config override " + " ".join(overrides) if overrides else "every component on"
        info[variant] = {"overrides": overrides, "how": how, "params": params}
        print(f"  {variant:<14}{params:>12,}  {how}")
    return info


def parse_task_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["chaining={...}", ...]`` -> {task: settings}; unknown tasks and bad JSON are errors."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in TASKS:
            raise SystemExit(
                f"--task-args: expected TASK=JSON with TASK in {list(TASKS)}: {item!r}"
            )
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--task-args {name}: not JSON: {err}") from None
        if not isinstance(extra, dict):
            raise SystemExit(f"--task-args {name}: expected a JSON object, got {text!r}")
        out[name] = {**out.get(name, {}), **extra}
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (task, variant, seed) run from a JSON-able job (see ``main``): train, then score."""
    task = AblationTask(**{**job["task"], "eval_tasks": tuple(job["task"]["eval_tasks"]),
                           "metrics": tuple(job["task"]["metrics"])})  # fmt: skip
    cfg = load_config(job["config"], job["overrides"])
    return train_and_score(cfg, task, job["eval_batches"])


def _run_in_subprocess(job: dict[str, Any]) -> dict[str, Any]:
    # A fresh interpreter per run (the script's own ``--run-job``): nothing is shared between
    # runs, so results are those of ``--jobs 1``; torch gets the parent's thread count.
    payload = json.dumps({**job, "threads": torch.get_num_threads()})
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--run-job"],
        input=payload, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"run {job['name']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _job_main() -> None:
    """``--run-job``: read one job as JSON on stdin, print its result as one JSON line."""
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job["threads"])
    print(json.dumps(run_job(job)))


def run_all(
    jobs: list[dict[str, Any]], n_workers: int, progress: Path | None = None
) -> list[dict[str, Any]]:
    """Results of ``jobs`` in their order: in this process, or ``n_workers`` at a time.

    ``progress``: append each finished run as a JSON line, so a sweep cut short keeps its runs.
    """
    bar = tqdm(total=len(jobs), desc="ablation runs", unit="run")

    def done(job: dict[str, Any], result: dict[str, Any]) -> None:
        bar.update()
        bar.set_postfix_str(f"{job['name']}: loss {result['loss_last']:.2f}")
        if progress is not None:
            with progress.open("a") as f:
                f.write(json.dumps({"name": job["name"], **result}) + "\n")

    if n_workers <= 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            done(job, results[-1])
        return results
    with ThreadPoolExecutor(n_workers) as pool:  # threads only wait on the subprocesses
        futures = {pool.submit(_run_in_subprocess, job): job for job in jobs}
        try:
            for future in as_completed(futures):
                done(futures[future], future.result())  # the first failure raises here
        except BaseException:
            pool.shutdown(cancel_futures=True)  # runs not started yet are dropped
            raise
    return [future.result() for future in futures]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; returns (and writes) the report."""
    args = parse_args(argv)
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    s = _settings(args)
    extra = parse_task_args(args.task_args)
    tasks = {name: with_task_args(TASKS[name], extra.get(name, {})) for name in args.tasks}
    pairs = plan_runs(args.tasks, args.all_variants, args.variants)
    if not pairs:
        raise SystemExit("no (task, variant) run left: check --variants")
    variants = [v for v in VARIANTS if any(v == pv for _, pv in pairs)]
    info = _variant_info(s, variants)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ablations-"))
    # seed-major: a sweep cut short (see ``run_all``'s progress file) has every variant's first seeds
    keys = [(t, v, seed) for seed in range(args.seeds) for t, v in pairs]
    jobs = [
        {
            "name": f"{t}-{v}-seed{seed}",
            "task": tasks[t].__dict__,
            "config": s.base_config,
            "overrides": [
                *run_overrides(s, tasks[t], seed, work / f"{t}-{v}-seed{seed}"),
                *info[v]["overrides"],
            ],
            "eval_batches": s.eval_batches,
        }
        for t, v, seed in keys
    ]
    t0 = time.perf_counter()
    try:
        progress = Path(args.out).with_suffix(".runs.jsonl")
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.unlink(missing_ok=True)
        results = run_all(jobs, args.jobs, progress)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    progress.unlink(missing_ok=True)  # every run is in the report now
    runs = [
        {"task": t, "variant": v, "seed": seed, **result}
        for (t, v, seed), result in zip(keys, results, strict=True)
    ]
    summary = summarize(runs)
    report = {
        "settings": s.__dict__,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "torch": torch.__version__,
        "variants": info,
        "tasks": {name: tasks[name].__dict__ for name in args.tasks},
        "runs": runs,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    print(format_table(summary, variants))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    title = (
        f"{s.steps} steps x {s.batch_size} x {s.seq_len} tokens, {args.seeds} seed(s), scale"
        f" {s.scale}; bars: mean, 95% t-interval over seeds"
    )
    plot_summary(summary, variants, plot, title)
    print(f"wrote {out} and {plot} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["--run-job"]:
        _job_main()
    else:
        main()
