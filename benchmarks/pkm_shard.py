"""Sharded PKM value table: bytes and memory per rank of three layouts, counted and timed on CPU.

Run:  python benchmarks/pkm_shard.py --out docs/results/pkm_shard.json   (PNG next to it; a few
minutes on 2 CPU cores)

Part 1, formulas. Per rank and per optimizer step, one PKM layer: R rows of Dv values (fp32,
b = 4 bytes), N tokens on the rank, H heads of k reads (Hk = H k reads per token, rows sent as
int32, weights fp32), the table split over a shard group of n ranks and replicated over r
groups (world n r). Conventions of ``parallel.comm``: bytes this rank sends; an all-gather over
n sends its input n - 1 times, an all-to-all (n - 1) / n of its input, a reduce-scatter
(n - 1) / n of its input, a ring all-reduce 2 (n - 1) / n of it.

  columns (ours, ``parallel.pkm.ShardedBagLookup``): every rank holds all R rows, Dv / n columns
    all-gather of rows + weights (fwd)          (n - 1) N Hk (4 + 4)
    all-to-all of the partial bags (fwd)        (n - 1) N (Dv / n) b
    the same all-to-all for its gradient (bwd)  (n - 1) N (Dv / n) b
    reduce-scatter of the weight grads (bwd)    (n - 1) N Hk 4
    replica all-reduce of the shard grad        2 (r - 1) / r R (Dv / n) b
    memory: state 16 R Dv / n (param, grad, 2 AdamW moments) + transient n N Hk 8 (gathered rows
    and weights) + n N (Dv / n) b (partial bags) + N Dv b (output)
  rows (what the docs reject): every rank holds R / n full rows
    all-gather of rows + weights (fwd)          (n - 1) N Hk (4 + 4)
    reduce-scatter of the [n N, Dv] partials    (n - 1) N Dv b
    its backward, an all-gather (bwd)           (n - 1) N Dv b
    reduce-scatter of the weight grads (bwd)    (n - 1) N Hk 4   (kept for symmetry with columns:
                                                the weight grad of a read is also split over ranks)
    replica all-reduce                          2 (r - 1) / r (R / n) Dv b
    memory: state 16 R Dv / n + transient n N Hk 8 + n N Dv b (partial bags) + N Dv b (output)
  fsdp (the table inside FSDP2, ``reshard_after_forward=True``): row shards, gathered every pass
    all-gather of the table (fwd)               (n - 1) / n R Dv b
    again before the backward                   (n - 1) / n R Dv b
    reduce-scatter of the dense [R, Dv] grad    (n - 1) / n R Dv b
    replica all-reduce (HSDP)                   2 (r - 1) / r R Dv / n b
    memory: state 16 R Dv / n + transient R Dv b (full table) + R Dv b (dense grad) + N Dv b
    (output; counted in every layout, so that they compare)
  columns and fsdp send the same bytes at R* = N (12 n Hk + 2 Dv b) / (3 Dv b) rows (r = 1);
  above R*, fsdp sends more, growing with R, while columns' traffic does not depend on R.

Shapes from ``configs/hydra-1.6b.yaml`` (R = 256^2) and ``configs/hydra-1.6b-pkm1m.yaml``
(R = 1024^2): Dv = d_model, H and k of ``model.pkm``, N = batch_size x seq_len tokens per rank;
8 GPUs (n = 8, r = 1) and 64 GPUs (n = 8, r = 8).

Part 2, measured on CPU with gloo at world 2 and 4 (world 4 oversubscribes a 2-core machine:
its times are contended), one thread per rank, fp32, random rows and weights, a fixed output
cotangent. Per shape and world size:
  (a) the ``CommStats`` bytes of one fwd + bwd of ``ShardedBagLookup`` (the table's local
      ``Shard(1)`` block) equal the columns formula exactly; and those of the fsdp baseline (an
      autograd function here, ``_fsdp_lookup``, that does FSDP2's all-gather, storage free after
      forward, re-gather before backward and reduce-scatter of the dense grad) equal its formula;
  (b) fwd + bwd wall time, median of ``--reps`` after warm-up, barrier before each, rank 0: the
      columns layout against fsdp at equal total work (every rank bags its own N tokens);
      reported as fsdp / columns;
  (c) the largest tensor an op returns on a rank in each layout (a ``TorchDispatchMode``), bytes.
The outputs and weight gradients of both layouts are compared (same table, same reads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from benchmarks._measure import LargestTensor  # noqa: E402
from kernels.pkm.op import pkm_lookup  # noqa: E402
from parallel.comm import CommStats  # noqa: E402
from parallel.local_ranks import run_on_ranks  # noqa: E402
from parallel.pkm import ShardedBagLookup  # noqa: E402
from pretrain.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "hydra-1.6b": ROOT / "configs/hydra-1.6b.yaml",
    "hydra-1.6b-pkm1m": ROOT / "configs/hydra-1.6b-pkm1m.yaml",
}
GPU_LAYOUTS = ((8, 1), (8, 8))  # (shard group n, replicas r): 8 and 64 GPUs
FP32 = 4
STRATEGIES = ("columns", "rows", "fsdp")
SWEEP_ROWS = [2**e for e in range(14, 23)]  # the plot's table sizes, 16K ... 4M rows
# which pass each term is sent in (the tables' fwd / bwd / replica columns)
PHASES = {
    "pkm/all_gather": "fwd",
    "pkm/all_to_all": "fwd",
    "pkm/all_to_all_grad": "bwd",
    "pkm/reduce_scatter": "bwd",
    "pkm/replica_all_reduce": "replica",
    "rows/all_gather": "fwd",
    "rows/reduce_scatter": "fwd",
    "rows/all_gather_grad": "bwd",
    "rows/weight_reduce_scatter": "bwd",
    "rows/replica_all_reduce": "replica",
    "fsdp/all_gather": "fwd",
    "fsdp/all_gather_bwd": "bwd",
    "fsdp/reduce_scatter": "bwd",
    "fsdp/replica_all_reduce": "replica",
}


@dataclass(frozen=True)
class PKMShape:
    """One PKM layer's lookup: R rows of Dv, H heads of k reads, N tokens per rank."""

    rows: int  # R
    d_value: int  # Dv
    n_heads: int  # H
    top_k: int  # k
    tokens: int  # N

    @property
    def reads(self) -> int:  # Hk
        return self.n_heads * self.top_k

    @classmethod
    def from_config(cls, path: Path) -> PKMShape:
        cfg = load_config(path)
        pkm = cfg.model.pkm
        return cls(
            rows=pkm.n_subkeys**2,
            d_value=pkm.d_value if pkm.d_value is not None else cfg.model.d_model,
            n_heads=pkm.n_heads,
            top_k=pkm.top_k,
            tokens=cfg.train.batch_size * cfg.train.seq_len,
        )


# the measured shapes: a small table, a large one, and one below the bytes crossover R*
MEASURED_SHAPES = {
    "small": PKMShape(rows=128**2, d_value=256, n_heads=2, top_k=8, tokens=1024),
    "large": PKMShape(rows=512**2, d_value=256, n_heads=2, top_k=8, tokens=1024),
    "tiny_table": PKMShape(rows=32**2, d_value=256, n_heads=2, top_k=8, tokens=1024),
}


# ------------------------------------------------------------------------------ formulas


def _replica_all_reduce(nbytes: int, r: int) -> int:
    return 2 * (r - 1) * nbytes // r


def columns_bytes(s: PKMShape, n: int, r: int, b: int = FP32) -> dict[str, int]:
    """Bytes one rank sends per step with the table split by columns (``ShardedBagLookup``),
    keyed as its ``CommStats`` counts them; zero terms left out, as they are not counted."""
    out = (n - 1) * s.tokens * (s.d_value // n) * b
    terms = {
        "pkm/all_gather": (n - 1) * s.tokens * s.reads * (4 + 4),  # int32 rows, fp32 weights
        "pkm/all_to_all": out,
        "pkm/all_to_all_grad": out,
        "pkm/reduce_scatter": (n - 1) * s.tokens * s.reads * 4,
        "pkm/replica_all_reduce": _replica_all_reduce(s.rows * (s.d_value // n) * b, r),
    }
    return {key: v for key, v in terms.items() if v}


def rows_bytes(s: PKMShape, n: int, r: int, b: int = FP32) -> dict[str, int]:
    """Bytes one rank sends per step with the table split by rows: the [n N, Dv] partial bags
    are summed by a reduce-scatter (its backward an all-gather of the output gradient)."""
    partial = (n - 1) * s.tokens * s.d_value * b
    terms = {
        "rows/all_gather": (n - 1) * s.tokens * s.reads * (4 + 4),
        "rows/reduce_scatter": partial,
        "rows/all_gather_grad": partial,
        # a read's weight gradient is a sum over the n row owners' partials (symmetry with
        # columns: the same (n - 1) N Hk 4)
        "rows/weight_reduce_scatter": (n - 1) * s.tokens * s.reads * 4,
        "rows/replica_all_reduce": _replica_all_reduce(s.rows // n * s.d_value * b, r),
    }
    return {key: v for key, v in terms.items() if v}


def fsdp_bytes(s: PKMShape, n: int, r: int, b: int = FP32) -> dict[str, int]:
    """Bytes one rank sends per step with the table inside FSDP2 (row shards of R / n, gathered
    in forward and again in backward, the dense gradient reduce-scattered; HSDP replicas)."""
    table = (n - 1) * s.rows * s.d_value * b // n
    terms = {
        "fsdp/all_gather": table,
        "fsdp/all_gather_bwd": table,
        "fsdp/reduce_scatter": table,
        "fsdp/replica_all_reduce": _replica_all_reduce(s.rows * s.d_value * b // n, r),
    }
    return {key: v for key, v in terms.items() if v}


BYTES: dict[str, Callable[..., dict[str, int]]] = {
    "columns": columns_bytes,
    "rows": rows_bytes,
    "fsdp": fsdp_bytes,
}


def state_bytes(s: PKMShape, n: int) -> int:
    """Table state per rank, every layout: fp32 param, grad and two AdamW moments of R Dv / n."""
    return 16 * s.rows * s.d_value // n


def transient_bytes(strategy: str, s: PKMShape, n: int, b: int = FP32) -> int:
    """The lookup's transient memory per rank (module docstring); the output [N, Dv] in all."""
    output = s.tokens * s.d_value * b
    gathered = n * s.tokens * s.reads * 8  # rows (int32) and weights (fp32) of the group
    if strategy == "columns":
        return gathered + n * s.tokens * (s.d_value // n) * b + output
    if strategy == "rows":
        return gathered + n * s.tokens * s.d_value * b + output
    if strategy == "fsdp":
        return 2 * s.rows * s.d_value * b + output  # the full table and its dense gradient
    raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def crossover_rows(s: PKMShape, n: int, b: int = FP32) -> float:
    """R* at which fsdp sends as many bytes as columns (no replicas)."""
    return s.tokens * (12 * n * s.reads + 2 * s.d_value * b) / (3 * s.d_value * b)


def formula_row(name: str, s: PKMShape, strategy: str, n: int, r: int) -> dict[str, Any]:
    """One layout at one shape: its terms, their sum per pass, and memory per rank."""
    terms = BYTES[strategy](s, n, r)
    by_phase = {p: sum(v for k, v in terms.items() if PHASES[k] == p) for p in PHASES.values()}
    state, transient = state_bytes(s, n), transient_bytes(strategy, s, n)
    return {
        "config": name,
        "gpus": n * r,
        "n": n,
        "replicas": r,
        "strategy": strategy,
        "terms": terms,
        **{f"{phase}_bytes": v for phase, v in by_phase.items()},
        "total_bytes": sum(terms.values()),
        "state_bytes": state,
        "transient_bytes": transient,
        "memory_bytes": state + transient,
    }


def formula_rows(shapes: dict[str, PKMShape]) -> list[dict[str, Any]]:
    rows = [
        formula_row(name, s, strategy, n, r)
        for name, s in shapes.items()
        for n, r in GPU_LAYOUTS
        for strategy in STRATEGIES
    ]
    for row in rows:  # each layout's bytes over ours, same shape and GPUs
        ours = next(
            o
            for o in rows
            if (o["config"], o["gpus"], o["strategy"]) == (row["config"], row["gpus"], "columns")
        )
        row["bytes_over_columns"] = row["total_bytes"] / ours["total_bytes"]
    return rows


def sweep(s: PKMShape, n: int) -> dict[str, Any]:
    """Bytes and memory per rank of each layout over table sizes (``SWEEP_ROWS``), no replicas."""
    out: dict[str, Any] = {"rows": SWEEP_ROWS, "n": n}
    for strategy in STRATEGIES:
        shapes = [replace(s, rows=rows) for rows in SWEEP_ROWS]
        out[f"{strategy}_bytes"] = [sum(BYTES[strategy](x, n, 1).values()) for x in shapes]
        out[f"{strategy}_memory_bytes"] = [
            state_bytes(x, n) + transient_bytes(strategy, x, n) for x in shapes
        ]
    return out


# ------------------------------------------------------------------------------ fsdp baseline


def _gather_into(
    full: torch.Tensor, shard: torch.Tensor, group: Any, stats: CommStats, key: str
) -> None:
    n = dist.get_world_size(group)
    dist.all_gather_into_tensor(full, shard, group=group)
    stats.add(key, (n - 1) * shard.numel() * shard.element_size(), n - 1)


class _Unshard(torch.autograd.Function):
    """FSDP2's unshard: all-gather the row shards [R / n, Dv] into the table [R, Dv]; backward:
    reduce-scatter of the dense [R, Dv] gradient back to this rank's rows, averaged as FSDP does."""

    @staticmethod
    def forward(ctx, shard, group, stats):  # noqa: ANN001
        ctx.group, ctx.stats = group, stats
        n = dist.get_world_size(group)
        full = shard.new_empty((n * shard.shape[0], *shard.shape[1:]))
        _gather_into(full, shard, group, stats, "fsdp/all_gather")
        return full

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        n = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // n, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        ctx.stats.add("fsdp/reduce_scatter", (n - 1) * out.numel() * out.element_size(), n - 1)
        return out / n, None, None


class _Regather(torch.autograd.Function):
    """Identity on the lookup's output; its backward (which runs before the lookup's) refills the
    table's freed storage with a second all-gather, as FSDP2's pre-backward hook does."""

    @staticmethod
    def forward(ctx, out, full, shard, group, stats):  # noqa: ANN001
        ctx.full, ctx.shard, ctx.group, ctx.stats = full, shard, group, stats
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        ctx.full.untyped_storage().resize_(ctx.full.numel() * ctx.full.element_size())
        # refilling the storage the bag saved is no modification of it (FSDP2 does the same)
        with torch.autograd._unsafe_preserve_version_counter(ctx.full):
            _gather_into(ctx.full, ctx.shard, ctx.group, ctx.stats, "fsdp/all_gather_bwd")
        return grad, None, None, None, None


def _fsdp_lookup(
    shard: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    group: Any,
    stats: CommStats,
) -> torch.Tensor:
    """The table inside FSDP2 (``reshard_after_forward=True``): gather, bag this rank's reads
    against the full table, free the table's storage (the bag's backward keeps a handle to it)."""
    full = _Unshard.apply(shard, group, stats)
    out = pkm_lookup(full, indices, weights, "torch")
    full.untyped_storage().resize_(0)
    return _Regather.apply(out, full.detach(), shard.detach(), group, stats)


# ------------------------------------------------------------------------------ measurement


@dataclass
class _Setup:
    """One rank's tables (a column shard, a row shard of the same table), reads and cotangent."""

    columns: torch.Tensor  # [R, Dv / n]
    rows: torch.Tensor  # [R / n, Dv]
    indices: torch.Tensor  # [N, Hk] int64
    weights: torch.Tensor  # [N, Hk] fp32 leaf
    cotangent: torch.Tensor  # [N, Dv]


def _setup(s: PKMShape, rank: int, world: int) -> _Setup:
    table = torch.randn(s.rows, s.d_value, generator=torch.Generator().manual_seed(0))
    cols, rows = s.d_value // world, s.rows // world
    gen = torch.Generator().manual_seed(1 + rank)  # every rank its own reads
    indices = torch.randint(0, s.rows, (s.tokens, s.reads), generator=gen)
    weights = torch.rand(s.tokens, s.reads, generator=gen)
    return _Setup(
        columns=table[:, rank * cols : (rank + 1) * cols].clone().requires_grad_(),
        rows=table[rank * rows : (rank + 1) * rows].clone().requires_grad_(),
        indices=indices,
        weights=weights.requires_grad_(),
        cotangent=torch.randn(s.tokens, s.d_value, generator=gen),
    )


def _steps(setup: _Setup, world: int) -> dict[str, Callable[[CommStats], torch.Tensor]]:
    """Each layout's forward: one call with a fresh ``CommStats``."""
    group = dist.group.WORLD

    def columns(stats: CommStats) -> torch.Tensor:
        lookup = ShardedBagLookup(group, None, world, stats)
        return lookup(setup.columns, setup.indices, setup.weights, "torch")

    def fsdp(stats: CommStats) -> torch.Tensor:
        return _fsdp_lookup(setup.rows, setup.indices, setup.weights, group, stats)

    return {"columns": columns, "fsdp": fsdp}


def _fwd_bwd(setup: _Setup, forward: Callable[[CommStats], torch.Tensor]) -> CommStats:
    setup.columns.grad = setup.rows.grad = setup.weights.grad = None
    stats = CommStats()
    forward(stats).backward(setup.cotangent)
    return stats


def _timed(setup: _Setup, forward: Callable[[CommStats], torch.Tensor]) -> float:
    dist.barrier()  # every rank starts together: the time is the step's, not a straggler's
    start = time.perf_counter()
    _fwd_bwd(setup, forward)
    return time.perf_counter() - start


def _measure_rank(
    rank: int, world: int, shapes: dict[str, dict], reps: int, warmup: int, out: str
) -> None:
    """Per shape: counted bytes, largest tensor, outputs and weight grads of both layouts, then
    interleaved timed fwd + bwd; rank 0 writes every rank's records."""
    torch.set_num_threads(1)  # ranks share 2 cores: no intra-op threads on top
    # torch 2.13 deprecates the *_tensor collectives (parallel.pkm uses them too): once per rank
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    records = {}
    for name, fields in shapes.items():
        s = PKMShape(**fields)
        setup = _setup(s, rank, world)
        steps = _steps(setup, world)
        record: dict[str, Any] = {"counted": {}, "largest_bytes": {}, "times_s": {}}
        results = {}
        for strategy, forward in steps.items():
            largest = LargestTensor()
            with largest:
                stats = _fwd_bwd(setup, forward)
            record["counted"][strategy] = dict(stats.bytes)
            record["largest_bytes"][strategy] = largest.nbytes
            with torch.no_grad():
                y = forward(CommStats())
            results[strategy] = (y.detach().clone(), setup.weights.grad.clone())
        (y1, g1), (y2, g2) = results["columns"], results["fsdp"]
        record["outputs_match"] = bool(torch.allclose(y1, y2, rtol=1e-5, atol=1e-5))
        record["weight_grads_match"] = bool(torch.allclose(g1, g2, rtol=1e-4, atol=1e-5))
        for _ in range(warmup):
            for forward in steps.values():
                _fwd_bwd(setup, forward)
        times: dict[str, list[float]] = {strategy: [] for strategy in steps}
        for _ in range(reps):  # interleaved: drift of the machine hits both layouts alike
            for strategy, forward in steps.items():
                times[strategy].append(_timed(setup, forward))
        record["times_s"] = times
        records[name] = record
        del setup, steps, results
    gathered: list = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def measure(
    shapes: dict[str, PKMShape], world: int, reps: int, warmup: int, tmp: Path
) -> list[dict[str, Any]]:
    """Both layouts on ``world`` gloo ranks at each shape: counted bytes against the formulas,
    median fwd + bwd time (rank 0), largest tensor per rank; one record per shape."""
    out = tmp / f"pkm_shard_{world}.json"
    fields = {name: asdict(s) for name, s in shapes.items()}
    run_on_ranks(world, _measure_rank, fields, reps, warmup, str(out))
    per_rank = json.loads(out.read_text())  # [rank][shape name]
    records = []
    for name, s in shapes.items():
        ranks = [per_rank[r][name] for r in range(world)]
        formula = {"columns": columns_bytes(s, world, 1), "fsdp": fsdp_bytes(s, world, 1)}
        counted = {k: [rec["counted"][k] for rec in ranks] for k in formula}
        median = {k: statistics.median(v) for k, v in ranks[0]["times_s"].items()}
        records.append(
            {
                "shape": name,
                **asdict(s),
                "world": world,
                "oversubscribed": world > (os.cpu_count() or 1),
                "counted_per_rank": counted,
                "formula": formula,
                "counted_equals_formula": {
                    k: all(c == formula[k] for c in counted[k]) for k in formula
                },
                "crossover_rows": crossover_rows(s, world),
                "times_s": ranks[0]["times_s"],
                "median_s": median,
                "fsdp_over_columns_time": median["fsdp"] / median["columns"],
                "largest_bytes": {
                    k: max(rec["largest_bytes"][k] for rec in ranks) for k in formula
                },
                "one_shard_bytes": s.rows * s.d_value * FP32 // world,
                "full_table_bytes": s.rows * s.d_value * FP32,
                "outputs_match": all(rec["outputs_match"] for rec in ranks),
                "weight_grads_match": all(rec["weight_grads_match"] for rec in ranks),
            }
        )
    return records


# ------------------------------------------------------------------------------ output


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dev dependency
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f}"


def print_formulas(rows: list[dict[str, Any]], shapes: dict[str, PKMShape]) -> None:
    cells = [
        [
            r["config"],
            f"{r['gpus']} (n={r['n']}, r={r['replicas']})",
            r["strategy"],
            _gib(r["fwd_bytes"]),
            _gib(r["bwd_bytes"]),
            _gib(r["replica_bytes"]),
            _gib(r["total_bytes"]),
            f"{r['bytes_over_columns']:.2f}",
            _gib(r["state_bytes"]),
            _gib(r["transient_bytes"]),
            _gib(r["memory_bytes"]),
        ]
        for r in rows
    ]
    columns = (
        "config",
        "GPUs",
        "layout",
        "fwd GiB",
        "bwd GiB",
        "replica GiB",
        "sent GiB",
        "x columns",
        "state GiB",
        "transient GiB",
        "memory GiB",
    )
    title = "PKM table per rank and step (formula; fp32 values, int32 rows, fp32 weights)"
    _print_table(title, columns, cells)
    for name, s in shapes.items():
        print(
            f"  {name}: R={s.rows:,} Dv={s.d_value} H={s.n_heads} k={s.top_k} N={s.tokens:,};"
            f" bytes crossover columns = fsdp at R* = {crossover_rows(s, 8):,.0f} rows (n=8)"
        )


def print_measured(records: list[dict[str, Any]]) -> None:
    cells = []
    for r in records:
        ok = r["counted_equals_formula"]
        columns = sum(r["counted_per_rank"]["columns"][0].values())
        fsdp = sum(r["counted_per_rank"]["fsdp"][0].values())
        cells.append(
            [
                r["shape"],
                f"{r['world']}{' (oversubscribed)' if r['oversubscribed'] else ''}",
                f"R={r['rows']:,}",
                f"{columns:,} ({'=' if ok['columns'] else '!='})",
                f"{fsdp:,} ({'=' if ok['fsdp'] else '!='})",
                f"{r['median_s']['columns'] * 1e3:.1f}",
                f"{r['median_s']['fsdp'] * 1e3:.1f}",
                f"{r['fsdp_over_columns_time']:.2f}",
                f"{r['largest_bytes']['columns'] / 2**20:.2f}",
                f"{r['largest_bytes']['fsdp'] / 2**20:.2f}",
                "yes" if r["outputs_match"] and r["weight_grads_match"] else "NO",
            ]
        )
    columns = (
        "shape",
        "world",
        "table",
        "columns B (= formula)",
        "fsdp B (= formula)",
        "columns ms",
        "fsdp ms",
        "fsdp/columns",
        "largest col MiB",
        "largest fsdp MiB",
        "same out",
    )
    title = "measured on CPU, gloo, 1 thread per rank: bytes rank 0 sent, fwd+bwd median (rank 0)"
    _print_table(title, columns, cells)
    for world in sorted({r["world"] for r in records if r["oversubscribed"]}):
        print(f"  world {world} runs {world} ranks on {os.cpu_count()} cores: contended times")


def plot(sweep_data: dict[str, Any], shapes: dict[str, PKMShape], path: Path) -> None:
    """Bytes and memory per rank against table rows (formula, 8 GPUs), both config shapes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = sweep_data["rows"]
    for strategy, marker in zip(STRATEGIES, "os^", strict=True):
        label = {"columns": "columns (ours)", "rows": "rows", "fsdp": "fsdp (FSDP2)"}[strategy]
        left.loglog(
            xs, [b / 2**30 for b in sweep_data[f"{strategy}_bytes"]], f"{marker}-", label=label
        )
        right.loglog(
            xs,
            [b / 2**30 for b in sweep_data[f"{strategy}_memory_bytes"]],
            f"{marker}-",
            label=label,
        )
    for ax in (left, right):
        for name, s in shapes.items():
            ax.axvline(s.rows, color="grey", ls=":", lw=1)
            ax.text(
                s.rows,
                0.98,
                f" {name}",
                transform=ax.get_xaxis_transform(),
                fontsize=8,
                va="top",
                rotation=90,
            )
        ax.set_xlabel("table rows R")
        ax.grid(True, which="both", alpha=0.3)
    s = next(iter(shapes.values()))
    n = sweep_data["n"]
    cross = crossover_rows(s, n)
    left.axvline(cross, color="C2", ls="--", lw=1, label=f"R* = {cross:,.0f}: fsdp = columns")
    for ax in (left, right):
        ax.legend(fontsize=8)
    left.set_ylabel("GiB sent per rank and step")
    left.set_title(f"traffic, {n} GPUs (Dv={s.d_value}, Hk={s.reads}, N={s.tokens:,})", fontsize=10)
    right.set_ylabel("GiB per rank (table state + transient)")
    right.set_title(f"memory, {n} GPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results/pkm_shard.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--worlds", default="2,4", help="gloo world sizes to measure")
    parser.add_argument("--reps", type=int, default=7, help="timed fwd + bwd per layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="world 2, the small shape, 2 reps")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    worlds = [2] if args.quick else [int(w) for w in args.worlds.split(",")]
    measured_shapes = {"small": MEASURED_SHAPES["small"]} if args.quick else MEASURED_SHAPES
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)

    shapes = {name: PKMShape.from_config(path) for name, path in CONFIGS.items()}
    rows = formula_rows(shapes)
    print_formulas(rows, shapes)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            records += measure(measured_shapes, world, reps, warmup, Path(tmp))
    print_measured(records)
    sweep_data = sweep(next(iter(shapes.values())), GPU_LAYOUTS[0][0])
    oversubscribed = max(worlds) > (os.cpu_count() or 1)
    report = {
        "meta": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_cores": os.cpu_count(),
            "threads_per_rank": 1,
        },
        "settings": {
            "value_bytes": FP32,
            "configs": {name: str(path.relative_to(ROOT)) for name, path in CONFIGS.items()},
            "shapes": {name: {**asdict(s), "reads": s.reads} for name, s in shapes.items()},
            "gpu_layouts": [{"gpus": n * r, "n": n, "replicas": r} for n, r in GPU_LAYOUTS],
            "measured_shapes": {name: asdict(s) for name, s in measured_shapes.items()},
            "worlds": worlds,
            "reps": reps,
            "warmup": warmup,
            "quick": args.quick,
        },
        "formula": {
            "rows": rows,
            "crossover_rows_n8": {name: crossover_rows(s, 8) for name, s in shapes.items()},
            "sweep": sweep_data,
        },
        "measured": {
            "records": records,
            "note": "more ranks than cores: contended times" if oversubscribed else "",
            "all_counted_equal_formula": all(
                all(r["counted_equals_formula"].values()) for r in records
            ),
        },
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(sweep_data, shapes, png)
    print(f"wrote {out} and {png} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
