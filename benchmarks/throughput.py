"""Tokens/s and peak memory of whole models, forward and forward + backward, over sequence lengths.

Run:  python benchmarks/throughput.py --device cuda --out throughput_cuda.json

Every family's 29m config (``--configs``, default Hydra, Transformer, Mamba-2, Attamba and
Dreamer) is built once, with every component switched on, and measured side by side in one run:
for each length L the models take turns, so a machine that drifts (heat, other load) affects
them alike. Every step holds the same number of tokens at every length (batch =
``--tokens-per-step`` / L, at least 1).

Inputs: the batches the trainer would train on. Each config's ``data`` section is read by the
trainer's own reader (``pretrain.data_config.reader_config`` + ``data_pipeline.reader``, seed
``train.seed`` as stage 0, ``seq_len`` = L, ``batch_size`` = the cell's batch), so every step's
rows are packed documents and the model is called as ``Trainer._forward_backward`` calls it:
``model(input_ids, seq_idx=seq_idx)``, every family, never the one-document path. The batches
of a cell (one per warmup, peak and timed step) are read before its timing starts; the JSON
records the mean documents per row (a padded tail counts as one) and the data sources.

Modes:
  fwd      inference forward (``torch.no_grad``, eval mode) -> logits.
  fwd+bwd  training forward (train mode), fp32 cross entropy against the batch's labels (-100
           ignored) + the MoE auxiliary loss, backward; gradients are dropped after each step
           (``zero_grad(set_to_none=True)``), no optimizer.

Precision: bf16 autocast on CUDA, fp32 on CPU, as the trainer runs. Kernel backends are the ones
the trainer would pick (``kernels.*`` of each config, ``auto`` by default), recorded in the JSON.
Time: the median of ``--repeats`` steps after ``--warmup`` steps (CUDA events on the GPU).
On the CPU each timed step also records the process's user and system CPU seconds and minor page
faults (``getrusage`` deltas, medians): system time and faults show a step spent in the kernel
(fresh memory being mapped and zeroed) rather than in arithmetic.
Peak memory: bytes allocated above what was live before the step (``benchmarks/_measure.py``).

Machine rate: the median rate of a dense matmul (fp32 4096^3 on the CPU with the run's thread
count, bf16 8192^3 on CUDA; smaller with ``--quick``) is measured once per run and recorded; each
cell's achieved GFLOP/s (its FLOPs per token x tokens/s) is recorded next to it as a fraction.

Ratios: tokens/s of each model over the baseline's (``--baseline``, default the Transformer), per
length and mode, next to the ratio predicted by the analytic FLOP count (``pretrain/flops.py``:
baseline FLOPs per token / model FLOPs per token), and measured / predicted, so the gap between
"fewer FLOPs" and "faster" is visible. ``flops.py`` counts each component's real backward
(``count_flops(...).train_per_token``), so the predicted ratios of the two modes can differ.

A cell (model, length, mode) that fails, out of memory included, is recorded with its error and
the run goes on. Writes a table (stdout), JSON (``--out``, rewritten after every cell so that a
killed run leaves what it measured; ``"complete": true`` at the end) and a PNG (``--plot``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
MALLOC_POLICY: str | None = None  # what the script applied at start (None when imported)
if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead (which is also where
    # ``benchmarks._measure`` is found).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))
    from pretrain.allocator import apply_malloc_policy

    # before any large allocation (docs/performance.md); it moves system time and page faults
    MALLOC_POLICY = apply_malloc_policy().describe()

from benchmarks._measure import (  # noqa: E402
    matmul_gflops,
    median_seconds,
    median_usage,
    peak_bytes,
)
from data_pipeline.reader import build_reader  # noqa: E402
from kernels.backends import BACKENDS, select_backends  # noqa: E402
from kernels.cpu import describe as describe_cpu_kernels  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.data_config import reader_config  # noqa: E402
from pretrain.flops import FlopCount, count_flops  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402
from pretrain.models import build_model  # noqa: E402
from pretrain.models.kernel_backends import apply_kernel_backends  # noqa: E402
from pretrain.models.lm import CausalLM  # noqa: E402
from pretrain.models.paths import PATH_NAMES  # noqa: E402

MODES = ("fwd", "fwd+bwd")
DEFAULT_CONFIGS = tuple(
    str(REPO / "configs" / f"{name}-29m.yaml")
    for name in ("hydra", "transformer", "mamba2", "attamba", "dreamer")
)
DEFAULTS = {"lengths": [1024, 2048, 4096, 8192, 16384], "tokens_per_step": 16384, "repeats": 3}
QUICK = {"lengths": [64, 128], "tokens_per_step": 256, "repeats": 1}
# the machine's matmul rate: (n, timed runs) per device, full and --quick
MATMUL = {"cpu": (4096, 5), "cuda": (8192, 20)}
MATMUL_QUICK = {"cpu": (256, 2), "cuda": (1024, 5)}
# --quick: every family at a few hundred thousand parameters, every Hydra component still present
# (2 blocks: SSM everywhere, attention and MoE in block 1, workspace after 0, PKM after 1).
QUICK_OVERRIDES = (
    "model.vocab_size=256",
    "model.d_model=64",
    "model.n_layers=2",
    "model.ssm={d_state: 16, head_dim: 16, chunk_size: 32}",
    "model.attention={n_heads: 4, window: 32, summary_chunk: 16, n_global: 8}",
    "model.moe={n_experts: 4, d_expert: 64, chunk_size: 16}",
    "model.workspace={after_blocks: [0], n_slots: 8, chunk_size: 32, n_heads: 4}",
    "model.pkm={after_blocks: [1], n_subkeys: 16, top_k: 4, n_heads: 2, d_key: 32}",
    "model.attamba={chunk_size: 4, leading_tokens: 8}",
)
# Dreamer's shapes differ (prelude + shared layer + coda; token-routed expert attention, whose
# MoE section keeps its routing): its own tiny sizes
QUICK_OVERRIDES_BY_FAMILY = {
    "dreamer": (
        "model.vocab_size=256",
        "model.d_model=64",
        "model.n_layers=3",
        "model.d_ff=128",
        "model.attention.n_heads=4",
        "model.moe.n_experts=4",
        "model.moe.d_expert=64",
        "model.dreamer.depth_heads=4",
        "model.dreamer.expert_key_dim=16",
    )
}
ERROR_CHARS = 500  # an OOM message can run to pages; keep its head


@dataclass
class Subject:
    """One model under test, with its FLOP count at every length."""

    name: str
    path: str
    cfg: RunConfig
    model: CausalLM
    backends: dict[str, str]
    flops: dict[int, FlopCount]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --quick fills the sizes it was not given with tiny ones."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="run-config YAMLs")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=None, help="batch = this / length")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (cpu 1, cuda 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument(
        "--override",
        nargs="+",
        default=[],
        help="run-config overrides for every config, e.g. model.n_layers=2 kernels.moe=torch",
    )
    p.add_argument("--baseline", default=None, help="config name in the denominator of ratios")
    p.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="which steps to time"
    )
    p.add_argument("--quick", action="store_true", help="tiny models and lengths (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default throughput_<device>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's, .png)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1  # CUDA: Triton / FlexAttention compiles
    args.out = Path(args.out or f"throughput_{args.device}.json")
    args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
    return args


def quick_overrides(path: str) -> tuple[str, ...]:
    """--quick's tiny sizes for the config at ``path`` (per family where the shapes differ)."""
    return QUICK_OVERRIDES_BY_FAMILY.get(load_config(path).model.family, QUICK_OVERRIDES)


def load_run_config(path: str, overrides: list[str], max_len: int) -> RunConfig:
    """The config at ``path`` with ``overrides``; max_seq_len raised to ``max_len`` if smaller."""
    cfg = load_config(path, overrides)
    if cfg.model.max_seq_len < max_len:  # only raised: lowering it could fail train.seq_len
        cfg = load_config(path, [*overrides, f"model.max_seq_len={max_len}"])
    return cfg


def build_subject(
    path: str, overrides: list[str], lengths: list[int], device: torch.device, seed: int
) -> Subject:
    """Build the model of ``path`` on ``device`` with every path on and the trainer's backends."""
    cfg = load_run_config(path, overrides, max(lengths))
    torch.manual_seed(seed)
    model = build_model(cfg.model, device=device)
    model.set_active_paths(PATH_NAMES)  # every component on, whatever a curriculum would say
    requested = {op: getattr(cfg.kernels, op) for op in BACKENDS}
    backends = select_backends(requested, device, deterministic=cfg.kernels.deterministic)
    apply_kernel_backends(model, backends)
    flops = {length: count_flops(model, length) for length in lengths}
    return Subject(Path(path).stem, str(path), cfg, model, backends, flops)


def read_batches(
    cfg: RunConfig, batch: int, length: int, count: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches [batch, length] the trainer's reader gives for ``cfg.data``.

    As ``Trainer._open_stage_data`` opens stage 0 (its seed, the sources' own weights), read in
    this process (no DataLoader workers) and moved to ``device``: input_ids, labels, seq_idx.
    """
    rcfg = reader_config(
        cfg.data,
        batch_size=batch,
        seq_len=length,
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
    )
    reader = iter(build_reader(dataclasses.replace(rcfg, num_workers=0)))
    keys = ("input_ids", "labels", "seq_idx")
    return [{k: b[k].to(device) for k in keys} for b in (next(reader) for _ in range(count))]


def documents_per_row(batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean number of documents in a row (a change of seq_idx starts one; padding is one)."""
    counts = [(b["seq_idx"].diff(dim=1) != 0).sum(dim=1) + 1 for b in batches]
    return float(torch.cat(counts).double().mean())


def make_step(
    model: CausalLM, mode: str, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> Callable[[], None]:
    """One step of ``mode``; call i takes ``batches[i % len(batches)]``, the trainer's call."""
    calls = itertools.count()

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd() -> None:
        b = batches[next(calls) % len(batches)]
        with torch.no_grad(), autocast():
            model(b["input_ids"], seq_idx=b["seq_idx"])

    def fwd_bwd() -> None:
        b = batches[next(calls) % len(batches)]
        with autocast():
            out = model(b["input_ids"], seq_idx=b["seq_idx"])
        (lm_loss(out.logits, b["labels"]) + out.aux_loss).backward()
        model.zero_grad(set_to_none=True)

    model.train(mode == "fwd+bwd")
    return fwd if mode == "fwd" else fwd_bwd


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_cell(
    subject: Subject, mode: str, length: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Measure one (model, length, mode) cell.

    Args:
        subject: the model under test.
        mode: ``fwd`` or ``fwd+bwd``.
        length: sequence length; the batch is ``args.tokens_per_step // length`` (at least 1).
        args: the parsed command line (warmup, repeats, tokens per step).
        device: where the model lives.

    Returns:
        The record: status ``ok`` with tokens/s, ms/step, peak MiB, TFLOP/s and the mean
        documents per row of its batches, or ``error`` with the exception's text; batch and
        FLOPs per token in both cases.
    """
    batch = max(1, args.tokens_per_step // length)
    flops = subject.flops[length]
    per_token = flops.forward_per_token if mode == "fwd" else flops.train_per_token
    row: dict[str, Any] = {
        "config": subject.name,
        "family": subject.cfg.model.family,
        "length": length,
        "mode": mode,
        "batch": batch,
        "tokens_per_step": batch * length,
        "flops_per_token": per_token,
    }
    try:
        count = args.warmup + 1 + args.repeats  # a fresh batch for every step
        batches = read_batches(subject.cfg, batch, length, count, device)
        row["documents_per_row"] = documents_per_row(batches)
        step = make_step(subject.model, mode, batches, device)
        for _ in range(args.warmup):
            step()
        peak = peak_bytes(step, device)
        usage = None
        if device.type == "cpu":
            usage = median_usage(step, args.repeats)
            seconds = usage.wall_s
        else:
            seconds = median_seconds(step, device, args.repeats, warmup=0)
    except Exception as err:  # noqa: BLE001 - OOM or a kernel failure: record it, measure the rest
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:ERROR_CHARS])
        return row
    finally:
        subject.model.zero_grad(set_to_none=True)  # a failed backward may leave gradients
        _free(device)
    tokens_per_s = batch * length / seconds
    row.update(
        status="ok",
        tokens_per_s=tokens_per_s,
        ms_per_step=seconds * 1e3,
        peak_mib=peak / 2**20,
        tflops=per_token * tokens_per_s / 1e12,
        gflops=per_token * tokens_per_s / 1e9,
    )
    if usage is not None:  # CPU: where the step's time went besides arithmetic
        row.update(
            ms_per_step_runs=[t * 1e3 for t in usage.wall_s_runs],  # the median's spread
            user_s_per_step=usage.user_s,
            system_s_per_step=usage.system_s,
            minor_faults_per_step=usage.minor_faults,
        )
    return row


def measure_matmul(device: torch.device, quick: bool) -> dict[str, Any]:
    """The machine's dense matmul rate at the run's precision and thread count."""
    n, repeats = (MATMUL_QUICK if quick else MATMUL)[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "gflops": matmul_gflops(n, repeats, device, dtype),
        "shape": [n, n, n],
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def add_matmul_fractions(records: list[dict[str, Any]], matmul: dict[str, Any]) -> None:
    """Each measured cell's achieved GFLOP/s as a fraction of the machine's matmul rate."""
    for row in records:
        if _ok(row):
            row["of_matmul"] = row["gflops"] / matmul["gflops"]


def run_grid(
    subjects: list[Subject],
    args: argparse.Namespace,
    device: torch.device,
    on_record: Callable[[list[dict[str, Any]]], None] = lambda records: None,
) -> list[dict[str, Any]]:
    """Every (length, model, mode) cell; lengths outermost so the models run side by side.

    ``on_record(records so far)`` is called after each cell (main writes the JSON there, so a
    run killed part-way still leaves its figures).
    """
    cells = [(length, s, mode) for length in args.lengths for s in subjects for mode in args.modes]
    records: list[dict[str, Any]] = []
    with tqdm(total=len(cells), desc="throughput", file=sys.stderr, disable=None) as progress:
        for length, subject, mode in cells:
            progress.set_postfix_str(f"{subject.name} L={length} {mode}")
            records.append(measure_cell(subject, mode, length, args, device))
            on_record(records)
            progress.update()
    return records


def pick_baseline(subjects: list[Subject], requested: str | None) -> str:
    """The requested config name, else the first Transformer, else the first config."""
    names = [s.name for s in subjects]
    if requested is not None:
        if requested not in names:
            raise SystemExit(f"--baseline {requested!r} is not one of the configs {names}")
        return requested
    return next((s.name for s in subjects if s.cfg.model.family == "transformer"), names[0])


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row["status"] == "ok"


def compute_ratios(records: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Model / baseline tokens/s per (length, mode), measured and predicted from FLOP counts.

    Args:
        records: every cell's record (``measure_cell``).
        baseline: config name in the denominator.

    Returns:
        One entry per non-baseline record; ``measured`` (and the ratios built on it) is None
        where either cell failed, ``predicted`` is always there.
    """
    by = {(r["config"], r["length"], r["mode"]): r for r in records}
    ratios = []
    for row in records:
        base = by.get((baseline, row["length"], row["mode"]))
        if row["config"] == baseline or base is None:
            continue
        predicted = base["flops_per_token"] / row["flops_per_token"]
        both = _ok(row) and _ok(base)
        measured = row["tokens_per_s"] / base["tokens_per_s"] if both else None
        ratios.append(
            {
                "config": row["config"],
                "baseline": baseline,
                "length": row["length"],
                "mode": row["mode"],
                "measured": measured,
                "predicted": predicted,
                "measured_over_predicted": measured / predicted if both else None,
                "peak_mib_ratio": row["peak_mib"] / base["peak_mib"] if both else None,
            }
        )
    return ratios


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _record_cells(r: dict[str, Any]) -> list[str]:
    head = [r["config"], str(r["length"]), str(r["batch"]), r["mode"]]
    if r["status"] != "ok":
        mflop = _fmt(r["flops_per_token"] / 1e6, ".1f")
        return head + ["error", "", "", mflop, "", "", "", "", r["error"]]
    of_matmul = r.get("of_matmul")
    return head + [
        _fmt(r["tokens_per_s"], ",.0f"),
        _fmt(r["ms_per_step"], ".1f"),
        _fmt(r["peak_mib"], ",.0f"),
        _fmt(r["flops_per_token"] / 1e6, ".1f"),
        _fmt(r["tflops"], ".3g"),
        _fmt(None if of_matmul is None else 100 * of_matmul, ".1f"),
        _fmt(r.get("system_s_per_step"), ".2f"),
        _fmt(r.get("minor_faults_per_step"), ",.0f"),
        "",
    ]


def _ratio_cells(r: dict[str, Any]) -> list[str]:
    return [
        f"{r['config']} / {r['baseline']}",
        str(r["length"]),
        r["mode"],
        _fmt(r["measured"], ".2f"),
        _fmt(r["predicted"], ".2f"),
        _fmt(r["measured_over_predicted"], ".2f"),
        _fmt(r["peak_mib_ratio"], ".2f"),
    ]


RECORD_COLUMNS = ("config", "L", "batch", "mode", "tokens/s", "ms/step", "peak MiB", "MFLOP/tok")
RECORD_COLUMNS += ("TFLOP/s", "% matmul", "sys s", "minflt", "error")
RATIO_COLUMNS = ("tokens/s ratio", "L", "mode", "measured", "predicted", "meas/pred", "mem ratio")


def print_tables(report: dict[str, Any]) -> None:
    """The records and the ratios, as rich tables (plain text without rich)."""
    m, mm = report["machine"], report["matmul"]
    title = (
        f"{m['device_name']} ({m['device']}, {report['settings']['precision']}, {m['threads']}"
        f" threads; matmul {mm['gflops']:,.0f} GFLOP/s {mm['dtype']})"
    )
    print_rich_tables(
        [
            (title, RECORD_COLUMNS, [_record_cells(r) for r in report["results"]]),
            (
                "ratios (predicted: FLOP count)",
                RATIO_COLUMNS,
                [_ratio_cells(r) for r in report["ratios"]],
            ),
        ]
    )


TableSpec = tuple[str, tuple[str, ...], list[list[str]]]  # title, columns, rows of cells


def print_rich_tables(tables: list[TableSpec], left: tuple[str, ...] = ("mode", "error")) -> None:
    """Print (title, columns, rows) tables with rich (plain text without it); the first column
    and those named in ``left`` are left-aligned, the rest right-aligned."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for name, columns, rows in tables:
            print(f"\n{name}\n" + " | ".join(columns))
            for cells in rows:
                print(" | ".join(cells))
        return
    console = Console(width=160)
    for name, columns, rows in tables:
        table = Table(title=name)
        for i, col in enumerate(columns):
            justify = "left" if i == 0 or col in left else "right"
            table.add_column(col, justify=justify, overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    """tokens/s vs length, log-log, one line per model; fwd and fwd+bwd panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    names = list(report["models"])
    modes = [m for m in MODES if any(r["mode"] == m for r in report["results"])]
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(1, len(modes), i + 1)
        for name in names:
            points = sorted(
                (r["length"], r["tokens_per_s"])
                for r in report["results"]
                if r["config"] == name and r["mode"] == mode and _ok(r)
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = report["settings"]["lengths"]
        ax.set_xticks(lengths, labels=[str(length) for length in lengths])
        ax.xaxis.set_minor_locator(NullLocator())  # log minor ticks would crowd the lengths
        ax.set_title(mode)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"{m['device_name']}: {s['tokens_per_step']} tokens per step, {s['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures come from."""
    cuda = device.type == "cuda"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def _raise_recompile_limit() -> None:
    # FlexAttention is compiled with dynamic=False: one graph per shape. A trainer sees one or two
    # shapes; this grid sees 2 per length and model, past dynamo's default limit of 8, beyond
    # which it silently runs flex eagerly (the full score matrix): a wrong measurement.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
            return


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        _raise_recompile_limit()
    stems = [Path(path).stem for path in args.configs]
    if len(set(stems)) != len(stems):  # records and ratios are keyed by the file's stem
        raise SystemExit(f"--configs: file names must differ, got {stems}")
    overrides = {
        path: [*(quick_overrides(path) if args.quick else ()), *args.override]
        for path in args.configs
    }
    subjects = [
        build_subject(p, overrides[p], args.lengths, device, args.seed) for p in args.configs
    ]
    baseline = pick_baseline(subjects, args.baseline)
    report = {
        "complete": False,
        "machine": machine_info(device),
        "matmul": measure_matmul(device, args.quick),
        "settings": _settings(args, subjects, overrides, baseline, device),
        "models": {s.name: _model_info(s) for s in subjects},
        "results": [],
        "ratios": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.plot.parent.mkdir(parents=True, exist_ok=True)

    def write(records: list[dict[str, Any]], complete: bool = False) -> None:
        add_matmul_fractions(records, report["matmul"])
        report.update(complete=complete, results=records, ratios=compute_ratios(records, baseline))
        args.out.write_text(json.dumps(report, indent=2))

    write(run_grid(subjects, args, device, on_record=write), complete=True)
    print_tables(report)
    plot_throughput(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return report


def _settings(
    args: argparse.Namespace,
    subjects: list[Subject],
    overrides: dict[str, list[str]],
    baseline: str,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "configs": [s.path for s in subjects],
        "lengths": args.lengths,
        "tokens_per_step": args.tokens_per_step,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "overrides": overrides,
        "quick": args.quick,
        "seed": args.seed,
        "baseline": baseline,
        "malloc_policy": MALLOC_POLICY,
        "cpu_kernels": describe_cpu_kernels(),
        "inputs": (
            "packed-document batches of each config's data section from the trainer's reader"
            " (reader_config + build_reader, seed train.seed, seq_len = length); the model gets"
            " input_ids and seq_idx as in Trainer._forward_backward, the loss the batch's labels"
        ),
    }


def _model_info(s: Subject) -> dict[str, Any]:
    return {
        "path": s.path,
        "family": s.cfg.model.family,
        "params": sum(p.numel() for p in s.model.parameters()),
        "kernel_backends": s.backends,
        "data_sources": [src.label for src in s.cfg.data.sources],
        "forward_flops_by_component": {str(L): f.components for L, f in s.flops.items()},
    }


if __name__ == "__main__":
    main()
