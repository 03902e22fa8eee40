"""Where a training step's time goes: self CPU time of one fwd+bwd step by model component,
next to each component's share of the step's FLOPs.

Run:  python benchmarks/profile_step.py --out docs/results/profile_step_cpu.json

For each config (``--configs``, default the Hydra, Transformer and Mamba-2 29m configs) and each
length (``--lengths``, default 8192 and 16384; batch 1) the model, its inputs and the step are
``benchmarks/throughput.py``'s fwd+bwd mode, imported from it: the trainer's packed batches,
``model(input_ids, seq_idx=seq_idx)``, fp32 cross entropy + the MoE auxiliary loss, backward,
gradients dropped. CPU, fp32, the trainer's kernel backends.

Per cell: ``--warmup`` untimed steps, then ``--repeats`` steps without the profiler (medians of
wall time, user and system CPU seconds and minor page faults, ``getrusage`` deltas; the rise of
the peak RSS from before the first step), then one step under ``torch.profiler`` (CPU, Python
calls recorded) whose time is split by component.

Attribution. Every event of the profiled step, Python calls included, has a self time (its time
less its children's); together they are the step. An event belongs to a component by:

* forward: the innermost component range or function around it. Ranges are ``record_function``
  ranges around module forwards (each wrapped for the profiled step only): each block path
  (ssm, attention, ffn, moe, workspace, pkm); inside a Mamba-2 mixer its ``in_proj`` and
  ``out_proj`` (SSM projections) and ``GatedRMSNorm`` (SSM gated norm); inside a MoE layer its
  ``GroupedExperts`` (experts; the rest of the layer is router/dispatch: routing, sorting,
  gathering, weighting, the aux loss); the path norms, the embedding and the final norm
  (norms/embedding); each block (residual: gate scaling and residual adds). Functions: anything
  in ``kernels/ssd/`` (SSM scan), ``Mamba2Mixer._causal_conv`` (SSM conv), ``lm_loss`` and the
  output projection (the ``F.linear`` call in ``CausalLM.forward``) (head+loss). The mixer's own
  elementwise work (dt softplus, the conv's SiLU, the D skip, splits) counts to the scan, where
  mamba_ssm's fused kernels also do it.
* backward: ops run by the autograd engine have no Python stack. Each runs inside the engine's
  ``evaluate_function: <Node>`` event, whose sequence number is that of the forward op that
  created the node: it takes that op's component. Gradient accumulation into a leaf
  (``AccumulateGrad``, no sequence number) runs right after the node that produced the gradient
  (the engine gives it first place in its queue): that node's component.
* what nothing claims (the step's Python glue, the engine's own work, the profiler) is ``other``,
  reported as it is: coverage = 1 - other / total.

FLOPs: ``pretrain.flops.component_breakdown(training=True)`` (a training step's FLOPs per token,
forward + backward as the code runs them, keyed ``<path>.<part>``) mapped onto the components
(``FLOP_PARTS``, else by path; elementwise work such as norms is not counted, so those components
show time without FLOPs); a component's GFLOP/s is its FLOPs of the step over its profiled self
time. The profiler slows the step (``profiler_overhead`` = profiled / unprofiled step time,
recorded), most where ops are small, so these rates are lower bounds; the whole step's GFLOP/s
uses the unprofiled time. The machine's dense matmul rate (``throughput.measure_matmul``: fp32,
the run's threads) is recorded for scale.

Output: a table per cell (stdout), JSON (``--out``, rewritten after each cell) and a PNG
(``--plot``, default the JSON's name with .png): per cell, a bar of time shares stacked next to
a bar of FLOP shares. ``--quick``: tiny models at one length (smoke test, numbers meaningless).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
MALLOC_POLICY: str | None = None  # what the script applied at start (None when imported)
if __name__ == "__main__":
    # as in throughput.py: benchmarks/kernels.py must not shadow the project's ``kernels``
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))
    from pretrain.allocator import apply_malloc_policy

    # as the trainer: before any large allocation; it moves system time and page faults
    MALLOC_POLICY = apply_malloc_policy().describe()

import kernels.ssd  # noqa: E402
from benchmarks._figures import save_figure  # noqa: E402
from benchmarks._measure import median_usage, peak_rss_mib  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    Subject,
    TableSpec,
    build_subject,
    machine_info,
    make_step,
    measure_matmul,
    print_rich_tables,
    quick_overrides,
    read_batches,
)
from kernels.cpu import describe as describe_cpu_kernels  # noqa: E402
from pretrain.flops import component_breakdown, count_flops  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402
from pretrain.models.common.moe import ChunkMoE, GroupedExperts  # noqa: E402
from pretrain.models.common.ssm import Mamba2Mixer  # noqa: E402
from pretrain.models.lm import CausalLM  # noqa: E402

# component key -> table label, in table and plot order
COMPONENTS = {
    "ssm_scan": "SSM scan",
    "ssm_conv": "SSM conv",
    "ssm_proj": "SSM projections",
    "ssm_norm": "SSM gated norm",
    "attention": "attention",
    "moe_router": "MoE router/dispatch",
    "moe_experts": "MoE experts",
    "workspace": "workspace",
    "pkm": "PKM",
    "ffn": "FFN",
    "residual": "residual (gates, adds)",
    "norms_embedding": "norms/embedding",
    "head_loss": "head+loss",
    "other": "other",
}
# block path name -> component of its whole module (finer ranges nest inside)
PATH_COMPONENTS = {
    "ssm": "ssm_scan",
    "attention": "attention",
    "ffn": "ffn",
    "moe": "moe_router",
    "workspace": "workspace",
    "pkm": "pkm",
    "depth": "attention",  # Dreamer's depth attention
}
# FLOP-count keys ("<path>.<part>") with a component of their own; others go by their path
FLOP_PARTS = {
    "ssm.scan": "ssm_scan",
    "ssm.conv": "ssm_conv",
    "ssm.proj": "ssm_proj",
    "ssm.norm": "ssm_norm",
    "moe.router": "moe_router",
    "moe.experts": "moe_experts",
    "head": "head_loss",
}
DEFAULT_CONFIGS = tuple(
    str(REPO / "configs" / f"{name}-29m.yaml") for name in ("hydra", "transformer", "mamba2")
)
DEFAULTS = {"lengths": [8192, 16384], "repeats": 3, "warmup": 1}
QUICK = {"lengths": [1024], "repeats": 1, "warmup": 1}
# --quick: throughput.py's tiny models, made wide enough (and the length long enough) that the
# per-op overheads (Python, the autograd engine, the profiler) do not swamp the breakdown
QUICK_EXTRA_OVERRIDES = ("model.d_model=128",)
RANGE_PREFIX = "component::"
STEP_RANGE = "profile_step::step"
ENGINE_NODE = "autograd::engine::evaluate_function: "
TOP_OTHER = 8  # the largest unattributed event names kept in the JSON
ERROR_CHARS = 500


# ----------------------------------------------------------------------------- ranges


def component_modules(model: CausalLM) -> dict[nn.Module, str]:
    """Module -> the component whose range its forward runs in (the innermost range wins)."""
    owner: dict[nn.Module, str] = {
        model.tok_embeddings: "norms_embedding",
        model.norm: "norms_embedding",
    }
    for block in model.blocks.values():
        owner[block] = "residual"
        for name, path in getattr(block, "paths", {}).items():
            owner[path] = PATH_COMPONENTS.get(name, "other")
        for norm in getattr(block, "norms", {}).values():
            owner[norm] = "norms_embedding"
    for m in model.modules():  # by type: wherever a family nests them
        if isinstance(m, Mamba2Mixer):
            owner.update({m: "ssm_scan", m.in_proj: "ssm_proj", m.out_proj: "ssm_proj"})
            owner[m.norm] = "ssm_norm"
        elif isinstance(m, ChunkMoE):
            owner[m] = "moe_router"
        elif isinstance(m, GroupedExperts):
            owner[m] = "moe_experts"
    return owner


class ComponentRanges:
    """While active, each module of ``component_modules`` runs its forward inside a
    ``record_function`` range named ``component::<key>``.

    The forward is wrapped per instance (an instance attribute, removed on exit), so that each
    range nests exactly inside the module's call: a range opened in a forward pre-hook and closed
    in a forward hook would straddle the hooks' own Python frames, and the profiler's event tree
    (built by time containment) would then count the overlap twice and subtract it once.
    """

    def __init__(self, model: CausalLM) -> None:
        self.owner = component_modules(model)
        self._saved: dict[nn.Module, Any] = {}

    def __enter__(self) -> ComponentRanges:
        for module, component in self.owner.items():
            self._saved[module] = module.__dict__.get("forward")
            module.forward = _in_range(module.forward, RANGE_PREFIX + component)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, saved in self._saved.items():
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        self._saved.clear()


def _in_range(forward: Any, name: str) -> Any:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(name):
            return forward(*args, **kwargs)

    return run


# ----------------------------------------------------------------------------- attribution

_FRAME = re.compile(r"^(?P<file>.+)\((?P<line>\d+)\): (?P<func>\S+)$")


@dataclass(frozen=True)
class FrameRule:
    """Python calls that belong to a component: one function (its ``func`` and ``line``) or,
    with ``func`` None, every function in files under the folder ``path``. With ``callee``, the
    rule claims instead the calls named ``callee`` made directly from that function."""

    path: str  # relative to the repository, "/"-separated
    component: str
    func: str | None = None
    line: int | None = None
    callee: str | None = None

    @classmethod
    def of_function(cls, fn: Any, component: str, callee: str | None = None) -> FrameRule:
        code = fn.__code__
        rel = Path(code.co_filename).resolve().relative_to(REPO).as_posix()
        return cls(rel, component, code.co_name, code.co_firstlineno, callee)

    def matches(self, name: str, parent: str) -> bool:
        if self.callee is not None:
            if name != self.callee:
                return False
            name = parent
        frame = _FRAME.match(name)
        if frame is None:
            return False
        file = frame["file"]
        if self.func is None:
            return f"/{self.path}/" in f"/{file}"
        return (
            file.endswith(self.path)
            and frame["func"] == self.func
            and int(frame["line"]) == self.line
        )


def frame_rules() -> tuple[FrameRule, ...]:
    """The calls attributed by the function they are in rather than by a module range."""
    ssd_dir = Path(kernels.ssd.__file__).resolve().parent.relative_to(REPO).as_posix()
    return (
        FrameRule(ssd_dir, "ssm_scan"),
        FrameRule.of_function(Mamba2Mixer._causal_conv, "ssm_conv"),
        FrameRule.of_function(lm_loss, "head_loss"),
        # the output projection: the one F.linear in the model's own forward
        FrameRule.of_function(CausalLM.forward, "head_loss", callee="<built-in function linear>"),
    )


class Classifier:
    """The component an event claims (a component range or a matching Python call), given its
    name and its parent's, or None; cached (a step repeats a few thousand names)."""

    def __init__(self, rules: tuple[FrameRule, ...]) -> None:
        self.rules = rules
        self._callees = {r.callee for r in rules if r.callee is not None}
        self._cache: dict[tuple[str, str], str | None] = {}

    def __call__(self, name: str, parent: str) -> str | None:
        key = (name, parent if name in self._callees else "")
        if key not in self._cache:
            self._cache[key] = self._classify(name, parent)
        return self._cache[key]

    def _classify(self, name: str, parent: str) -> str | None:
        if name.startswith(RANGE_PREFIX):
            return name[len(RANGE_PREFIX) :]
        return next((r.component for r in self.rules if r.matches(name, parent)), None)


@dataclass
class Attribution:
    """Self time (µs) of one profiled step by component, forward and backward."""

    forward_us: Counter[str] = field(default_factory=Counter)
    backward_us: Counter[str] = field(default_factory=Counter)
    other_events_us: Counter[str] = field(default_factory=Counter)  # what "other" is made of
    nodes: int = 0  # autograd nodes run
    nodes_unmatched: int = 0  # nodes whose forward op was not found (their time is "other")

    @property
    def total_us(self) -> float:
        return sum(self.forward_us.values()) + sum(self.backward_us.values())

    def component_us(self, component: str) -> float:
        return self.forward_us[component] + self.backward_us[component]

    @property
    def coverage(self) -> float:
        total = self.total_us
        return 1.0 - self.component_us("other") / total if total > 0 else 0.0


def _children(event: Any) -> list[Any]:
    return sorted(event.cpu_children, key=lambda e: e.time_range.start)


def attribute(root: Any, classify: Classifier) -> Attribution:
    """Split the self time of ``root`` (a profiler ``FunctionEvent``) and its descendants.

    Forward events take the innermost component their ancestors (or they) claim; events inside
    an autograd node take the component of the forward op that created the node (matched by
    thread and sequence number; the last forward op seen with that number, in time order, is
    the one that created the node).
    """
    result = Attribution()
    # (forward thread, sequence nr) -> component, or the backward node that created it
    creator: dict[tuple[int, int], Any] = {}
    in_nodes: list[tuple[Any, Any]] = []  # (event, its autograd node)
    stack: list[tuple[Any, str, Any]] = [(root, "other", None)]
    while stack:  # depth first, children in time order: forward ops are seen in time order
        event, component, node = stack.pop()
        parent = event.cpu_parent.name if event.cpu_parent is not None else ""
        component = classify(event.name, parent) or component
        outer = node  # the backward node this event runs in, if any
        if event.name.startswith(ENGINE_NODE):
            node = event
        if node is None:
            result.forward_us[component] += event.self_cpu_time_total
            if component == "other":
                result.other_events_us[event.name] += event.self_cpu_time_total
            if event.sequence_nr >= 0:
                creator[(event.thread, event.sequence_nr)] = component
        else:
            in_nodes.append((event, node))
            if event.sequence_nr >= 0 and outer is not None:
                # a forward op (or a nested graph's root) run inside a backward, by an op that
                # rebuilds its inputs there and differentiates through them: the nodes it
                # creates belong to the node running it
                creator.setdefault((event.thread, event.sequence_nr), outer)
        stack.extend((child, component, node) for child in reversed(_children(event)))
    node_component = _node_components([n for e, n in in_nodes if e is n], creator, result)
    for event, node in in_nodes:
        component = node_component[id(node)]
        result.backward_us[component] += event.self_cpu_time_total
        if component == "other":
            result.other_events_us[event.name] += event.self_cpu_time_total
    return result


def _node_components(
    nodes: list[Any], creator: dict[tuple[int, int], Any], result: Attribution
) -> dict[int, str]:
    """id(node) -> component: its creator's (a node created inside another node's backward: that
    node's), or (AccumulateGrad) the node run before it's."""
    out: dict[int, str] = {}
    previous = "other"
    for node in sorted(nodes, key=lambda n: n.time_range.start):  # creators start first
        if node.sequence_nr >= 0:
            component = creator.get((node.fwd_thread, node.sequence_nr))
            if component is not None and not isinstance(component, str):
                component = out.get(id(component))
            if component is None:
                result.nodes_unmatched += 1
                component = "other"
            previous = component
        else:
            component = previous
        out[id(node)] = component
    result.nodes = len(nodes)
    return out


def profile_one_step(model: CausalLM, step: Any) -> tuple[Attribution, float]:
    """Run ``step`` once under the profiler with component ranges; its attribution and the
    profiled step's wall seconds."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with ComponentRanges(model), profile(activities=[ProfilerActivity.CPU], with_stack=True) as p:
        t0 = time.perf_counter()
        with record_function(STEP_RANGE):
            step()
        wall = time.perf_counter() - t0
    roots = [e for e in p.events() if e.name == STEP_RANGE]
    if len(roots) != 1:
        raise RuntimeError(f"expected one {STEP_RANGE!r} event in the profile, got {len(roots)}")
    return attribute(roots[0], Classifier(frame_rules())), wall


# ----------------------------------------------------------------------------- FLOPs


def flop_component(key: str) -> str:
    """The component of a FLOP-count key ``<path>.<part>`` (``other`` if none fits)."""
    if key in FLOP_PARTS:
        return FLOP_PARTS[key]
    return PATH_COMPONENTS.get(key.split(".", 1)[0], "other")


def training_flops_per_token(model: CausalLM, length: int) -> tuple[dict[str, float], float]:
    """Training-step FLOPs per token (forward, backward, recomputation) by component, and in
    all: ``component_breakdown(training=True)``, whose parts must sum to ``count_flops``'s
    ``train_per_token`` (checked)."""
    parts = component_breakdown(model, length, training=True)
    total = count_flops(model, length, training=True).train_per_token
    if abs(sum(parts.values()) - total) > 1e-6 * total:
        raise RuntimeError(
            f"component_breakdown sums to {sum(parts.values()):.6g} training FLOPs per token,"
            f" count_flops counts {total:.6g}"
        )
    out = dict.fromkeys(COMPONENTS, 0.0)
    for key, flops in parts.items():
        out[flop_component(key)] += flops
    return out, total


# ----------------------------------------------------------------------------- measuring


def measure_cell(subject: Subject, length: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (model, length) cell: unprofiled step figures, then the profiled breakdown."""
    cpu = torch.device("cpu")
    row: dict[str, Any] = {
        "config": subject.name,
        "family": subject.cfg.model.family,
        "length": length,
        "batch": 1,
    }
    try:
        batches = read_batches(subject.cfg, 1, length, args.warmup + args.repeats + 1, cpu)
        step = make_step(subject.model, "fwd+bwd", batches, cpu)
        rss_before = peak_rss_mib()
        for _ in range(args.warmup):
            step()
        usage = median_usage(step, args.repeats)
        rss_after = peak_rss_mib()  # before profiling: the profiler's own memory is not the step's
        attribution, profiled_wall = profile_one_step(subject.model, step)
        flops, train_per_token = training_flops_per_token(subject.model, length)
    except Exception as err:  # noqa: BLE001 - out of memory or a failure: record it, go on
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:ERROR_CHARS])
        return row
    finally:
        subject.model.zero_grad(set_to_none=True)
    row.update(
        status="ok",
        step=usage.as_dict(),
        peak_rss_mib=rss_after,
        peak_rss_growth_mib=rss_after - rss_before,  # 0 if an earlier cell went higher
        gflops=train_per_token * length / usage.wall_s / 1e9,
        profiled_wall_s=profiled_wall,
        profiled_self_s=attribution.total_us / 1e6,
        profiler_overhead=profiled_wall / usage.wall_s,
        coverage=attribution.coverage,
        autograd_nodes=attribution.nodes,
        autograd_nodes_unmatched=attribution.nodes_unmatched,
        other_top=dict(
            (name, us / 1e6) for name, us in attribution.other_events_us.most_common(TOP_OTHER)
        ),
        components=component_rows(attribution, flops, length),
    )
    return row


def component_rows(
    attribution: Attribution, flops_per_token: dict[str, float], length: int
) -> dict[str, dict[str, float | None]]:
    """Per component: forward, backward and total self seconds, time share, training FLOPs of
    the step, FLOP share and GFLOP/s (None where it took no time)."""
    total_us = attribution.total_us
    total_flops = sum(flops_per_token.values()) * length
    rows = {}
    for key in COMPONENTS:
        seconds = attribution.component_us(key) / 1e6
        flops = flops_per_token[key] * length
        rows[key] = {
            "forward_s": attribution.forward_us[key] / 1e6,
            "backward_s": attribution.backward_us[key] / 1e6,
            "time_s": seconds,
            "time_share": seconds * 1e6 / total_us if total_us > 0 else 0.0,
            "flops": flops,
            "flop_share": flops / total_flops if total_flops > 0 else 0.0,
            "gflops": flops / seconds / 1e9 if seconds > 0 and flops > 0 else None,
        }
    return rows


# ----------------------------------------------------------------------------- output


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def cell_table(row: dict[str, Any]) -> TableSpec:
    """A cell's components (rows with neither time nor FLOPs are left out)."""
    name = f"{row['config']} L={row['length']}"
    if row["status"] != "ok":
        return name, ("error",), [[row["error"]]]
    s = row["step"]
    title = (
        f"{name}: step {s['wall_s']:.2f} s wall, user {s['user_s']:.2f} s, sys"
        f" {s['system_s']:.2f} s, {s['minor_faults']:,} minor faults, peak RSS"
        f" {row['peak_rss_mib']:,.0f} MiB (+{row['peak_rss_growth_mib']:,.0f});"
        f" {row['gflops']:.1f} GFLOP/s; profiled {row['profiled_wall_s']:.2f} s,"
        f" coverage {_pct(row['coverage'])}%"
    )
    cells = []
    for key, c in row["components"].items():
        if c["time_s"] == 0 and c["flops"] == 0:
            continue
        gflops = "-" if c["gflops"] is None else f"{c['gflops']:.1f}"
        cells.append(
            [
                COMPONENTS[key],
                f"{1e3 * c['forward_s']:,.1f}",
                f"{1e3 * c['backward_s']:,.1f}",
                _pct(c["time_share"]),
                _pct(c["flop_share"]),
                gflops,
            ]
        )
    return title, ("component", "fwd ms", "bwd ms", "time %", "FLOP %", "GFLOP/s"), cells


def plot_breakdown(report: dict[str, Any], path: Path) -> None:
    """Per cell, two stacked bars: time shares and training-FLOP shares by component."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 3), 5))
    colors = plt.get_cmap("tab20").colors
    for i, row in enumerate(rows):
        for j, share in enumerate(("time_share", "flop_share")):
            bottom = 0.0
            for k, (key, c) in enumerate(row["components"].items()):
                label = COMPONENTS[key] if i == 0 and j == 0 else None
                x = i + 0.38 * (j - 0.5)
                color = "0.6" if key == "other" else colors[k]
                ax.bar(x, c[share], 0.36, bottom=bottom, color=color, label=label)
                bottom += c[share]
    labels = [f"{r['config']}\nL={r['length']}\ntime | FLOPs" for r in rows]
    ax.set_xticks(range(len(rows)), labels=labels, fontsize=8)
    ax.set_ylabel("share of the fwd+bwd step")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['machine']['device_name']}: self CPU time vs training FLOPs")
    if rows:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; --quick fills the sizes it was not given with tiny ones."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="run-config YAMLs")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths")
    p.add_argument("--repeats", type=int, default=None, help="unprofiled timed steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--override", nargs="+", default=[], help="run-config overrides, every config")
    p.add_argument("--quick", action="store_true", help="tiny models and lengths (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/profile_step_cpu.json", help="JSON path")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON's, .png)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out)
    args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    overrides = {
        path: [
            *((*quick_overrides(path), *QUICK_EXTRA_OVERRIDES) if args.quick else ()),
            *args.override,
        ]
        for path in args.configs
    }
    subjects = [build_subject(p, overrides[p], args.lengths, cpu, args.seed) for p in args.configs]
    report: dict[str, Any] = {
        "complete": False,
        "machine": machine_info(cpu),
        "matmul": measure_matmul(cpu, args.quick),
        "settings": {
            "configs": args.configs,
            "lengths": args.lengths,
            "batch": 1,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "precision": "fp32",
            "overrides": overrides,
            "quick": args.quick,
            "seed": args.seed,
            "malloc_policy": MALLOC_POLICY,
            "cpu_kernels": describe_cpu_kernels(),
            "components": COMPONENTS,
        },
        "models": {
            s.name: {
                "family": s.cfg.model.family,
                "params": sum(p.numel() for p in s.model.parameters()),
                "kernel_backends": s.backends,
            }
            for s in subjects
        },
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cells = [(length, s) for length in args.lengths for s in subjects]
    with tqdm(total=len(cells), desc="profile_step", file=sys.stderr, disable=None) as progress:
        for length, subject in cells:
            progress.set_postfix_str(f"{subject.name} L={length}")
            report["results"].append(measure_cell(subject, length, args))
            args.out.write_text(json.dumps(report, indent=2))
            progress.update()
    report["complete"] = True
    args.out.write_text(json.dumps(report, indent=2))
    print_rich_tables([cell_table(r) for r in report["results"]], left=("component",))
    plot_breakdown(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return report


if __name__ == "__main__":
    main()
