"""One-command GPU acceptance check: kernel correctness, SSD speed, model throughput and MFU.

Run:  python benchmarks/gpu_check.py                          (one H100/H200; under 8 minutes)
      python benchmarks/gpu_check.py --device cpu --smoke     (smoke test: tiny shapes, < 60 s)

Four sections (``--sections a,b,c,d``), each in its own try/except: a section that fails is
recorded with status ``error`` and its message, and the others still run. The JSON (``--out``,
default ``docs/results/gpu_check.json``) is rewritten after every section (``"complete": false``
until the end), so a run cut short keeps what it measured; a short table is printed at the end.

a  correctness   every Triton kernel of ``kernels.backends.TRITON_MODULES`` against its PyTorch
                 reference on the device: forward outputs and input gradients for one fixed
                 cotangent, fp32 and bf16 inputs, max |kernel - ref| / max |ref| per tensor
                 against a stated tolerance (reference in fp64 on the same input values). Plus one
                 SSD case whose inputs are views into rows wide enough that element offsets pass
                 2^31 (b=2, T=66000: the 32-bit overflow of mamba_ssm #1015), checked in fp32
                 against ``ssd_scan_chunked`` in fp32.
b  ssd_timing    fwd+bwd of our Triton SSD and of mamba_ssm's ``mamba_chunk_scan_combined`` on the
                 same bf16 inputs in the same run (``benchmarks/kernels.py``'s cases, timer and
                 measured roofline), as ratios; and the bandwidth floor: compulsory bytes (inputs,
                 outputs, gradients) / measured copy bandwidth, with our % of it.
c  throughput    training tokens/s (fwd+bwd, bf16 autocast) of hydra-29m, transformer-29m and
                 mamba2-29m at 2K, 8K and 32K tokens per row, through ``benchmarks/throughput.py``.
d  train_step    hydra-1.6b on one GPU as the trainer builds it (``parallel.backend=none``, bf16
                 autocast, activation checkpointing, per-block torch.compile, AdamW step): step
                 time, tokens/s, model TFLOP/s, MFU against the dense bf16 peak of the GPU, peak
                 memory.

Targets (``targets`` in the JSON; docs/gpu_check.md explains them): every correctness case within
tolerance; our SSD fwd+bwd at least as fast as mamba_ssm's and >= 50% of its bandwidth floor;
hydra-29m >= 2x transformer-29m tokens/s at 8K, the ratio growing with length; hydra-1.6b >= 40%
MFU. ``--smoke`` runs the same code at tiny shapes (tiny models, 64/128 tokens, no 64K case, one
timed run): on CPU the Triton kernels run in Triton's interpreter, mamba_ssm is skipped (CUDA
only), and the figures mean nothing: they show that the script works. GPU figures come from a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))

# None of these imports triton (torch._dynamo does, and with it everything that compiles): on CPU
# main sets TRITON_INTERPRET=1 first, since triton reads it when it is imported.
from benchmarks._measure import median_seconds, peak_bytes  # noqa: E402
from benchmarks.kernels import (  # noqa: E402
    PKMDims,
    SSDDims,
    Target,
    TimingPlan,
    Unavailable,
    _rel_err,
    load_shapes,
    measure_roofline,
    pkm_case,
    plan_for,
    run_backend,
    ssd_case,
)
from benchmarks.throughput import (  # noqa: E402
    QUICK_OVERRIDES,
    _raise_recompile_limit,
    build_subject,
    compute_ratios,
    load_run_config,
    machine_info,
    measure_cell,
)
from kernels.backends import TRITON_MODULES, backend_problem  # noqa: E402
from kernels.pkm.ref import pkm_lookup_ref  # noqa: E402
from kernels.ssd.ref import ssd_scan_chunked  # noqa: E402
from pretrain.flops import count_flops  # noqa: E402
from pretrain.loss import lm_loss  # noqa: E402
from pretrain.models.paths import PATH_NAMES  # noqa: E402

SECTIONS = {"a": "correctness", "b": "ssd_timing", "c": "throughput", "d": "train_step"}
CONFIGS = REPO / "configs"
ERROR_CHARS = 600
INT32_MAX = 2**31 - 1

# Max |kernel - reference| / max |reference| per tensor. fp32 kernels run IEEE fp32 dots; bf16
# inputs round the matmul operands to bf16 (tensor cores), and dA sums a head's rounded terms over
# every position and channel, so it gets twice the room (as in tests/kernels/test_ssd_triton.py).
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
TOLERANCE_SSD_BF16_DA = 6e-2
# The long case compares two fp32 computations (kernel and chunked reference): a wrapped offset
# gives O(1) errors or NaN, rounding stays far below this.
TOLERANCE_LONG = 1e-3

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by the name CUDA reports. An H100 SXM
# reports "NVIDIA H100 80GB HBM3". The NVL variants run other clocks and are not in the table.
DENSE_BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H200": 989.0,
}

TARGETS = {
    "ssd_vs_mamba_ssm": 1.0,  # mamba_ssm ms / our ms, fwd+bwd, per shape
    "ssd_pct_bandwidth_floor": 50.0,  # our bandwidth floor / our time, %
    "hydra_over_transformer": 2.0,  # tokens/s ratio at the target length (8K), growing with L
    "mfu_1p6b": 0.40,
}


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """Shapes and repetitions of a full (GPU) run or a smoke run."""

    ssd_shapes: tuple[tuple[str, SSDDims], ...]  # correctness, fp32 and bf16 each
    ssd_long: SSDDims | None  # inputs as views into rows of ``long_width`` elements
    long_width: int
    pkm_shapes: tuple[tuple[str, PKMDims], ...]
    timing_shapes: tuple[tuple[str, SSDDims], ...]
    timing: TimingPlan | None  # None: benchmarks/kernels.py's plan for the device
    configs: tuple[str, ...]
    overrides: tuple[str, ...]  # applied to every throughput config
    lengths: tuple[int, ...]
    target_length: int  # where hydra / transformer >= 2 is asked for
    tokens_per_step: int
    warmup: int
    repeats: int
    big_config: str
    big_overrides: tuple[str, ...]
    big_seq_len: int
    big_batch: int | None  # None: the config's train.batch_size
    big_warmup: int  # untimed steps, the first of which compiles
    big_repeats: int
    # trainer: train.compile=true (per-block torch.compile, inductor); a dynamo backend name:
    # the same per-block compile with that backend; off: only the eager path
    compile: str = "trainer"
    notes: tuple[str, ...] = field(default_factory=tuple)


def _config(name: str) -> str:
    return str(CONFIGS / f"{name}.yaml")


def full_plan() -> Plan:
    """The GPU run: model-derived kernel shapes, 2K/8K/32K, hydra-1.6b at its 8K micro-batch."""
    s29, s16 = load_shapes("29m", False, None, None), load_shapes("1.6b", False, None, None)
    return Plan(
        # ragged lengths: the last chunk is partial
        ssd_shapes=(
            ("29m", dataclasses.replace(s29.ssd, b=2, T=2000)),
            ("1.6b", dataclasses.replace(s16.ssd, b=1, T=4000)),
        ),
        ssd_long=SSDDims(b=2, T=66000, H=4, P=16, N=16, G=1, L=64),
        long_width=33000,  # 66000 * 33000 > 2^31 - 1 within each row, and again per batch row
        pkm_shapes=(("29m", s29.pkm), ("1.6b", s16.pkm)),
        timing_shapes=(
            ("29m 8x2048", s29.ssd),
            ("1.6b 1x8192", s16.ssd),
            ("1.6b 1x32768", dataclasses.replace(s16.ssd, T=32768)),
        ),
        timing=None,
        configs=tuple(_config(f"{n}-29m") for n in ("hydra", "transformer", "mamba2")),
        overrides=(),
        lengths=(2048, 8192, 32768),
        target_length=8192,
        tokens_per_step=32768,
        warmup=2,
        repeats=3,
        big_config=_config("hydra-1.6b"),
        big_overrides=(),
        big_seq_len=8192,
        big_batch=None,
        big_warmup=2,
        big_repeats=3,
    )


def smoke_plan() -> Plan:
    """Tiny shapes through the same code (there are no transformer/mamba2 tiny configs: the 29m
    configs shrunk by throughput.py's --quick overrides, as its own smoke run does)."""
    tiny = SSDDims(b=1, T=70, H=2, P=8, N=8, G=1, L=32)
    return Plan(
        ssd_shapes=(("tiny", tiny),),
        ssd_long=SSDDims(b=2, T=100, H=2, P=8, N=8, G=1, L=32),
        long_width=64,
        pkm_shapes=(("tiny", PKMDims(n=20, k=6, R=36, Dv=24)),),
        timing_shapes=(("tiny", SSDDims(b=1, T=64, H=2, P=8, N=8, G=1, L=32)),),
        timing=TimingPlan(warmup=1, min_runs=1, max_runs=1, budget_s=0.0),
        configs=tuple(_config(f"{n}-29m") for n in ("hydra", "transformer", "mamba2")),
        overrides=QUICK_OVERRIDES,
        lengths=(64, 128),
        target_length=128,
        tokens_per_step=256,
        warmup=1,
        repeats=1,
        big_config=_config("hydra-29m"),
        big_overrides=QUICK_OVERRIDES,
        big_seq_len=128,
        big_batch=2,
        big_warmup=1,
        big_repeats=1,
        compile="off",
        notes=(
            "smoke run: tiny shapes, every figure meaningless",
            "section c: the 29m configs shrunk by benchmarks/throughput.py's QUICK_OVERRIDES",
            "section d: hydra-29m shrunk the same way in place of hydra-1.6b, eager only (the"
            " compiled path takes minutes on a small CPU; --smoke-compile runs it with aot_eager)",
        ),
    )


# ----------------------------------------------------------------------------- a: correctness


@dataclass
class Check:
    """One kernel case: how to make its inputs, call the kernel and the reference."""

    name: str
    op: str
    dtype: str
    dims: dict[str, Any]
    make_inputs: Callable[[], dict[str, torch.Tensor]]
    grad_names: tuple[str, ...]
    out_names: tuple[str, ...]
    kernel: Callable[[Callable[..., Any], dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
    reference: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
    ref_dtype: torch.dtype
    tolerance: dict[str, float]  # per output / gradient name ("dx" etc.), "*" for the rest


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ssd_inputs(d: SSDDims, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """benchmarks/kernels.py's SSD inputs (built in fp32 on the CPU, seed 0), x/B/C in ``dtype``;
    dt and A stay fp32, as the Mamba-2 mixer keeps them."""
    inputs = ssd_case(d, torch.device("cpu"), torch.Generator().manual_seed(0)).inputs
    return {k: v.to(device, dtype if k in ("x", "B", "C") else v.dtype) for k, v in inputs.items()}


def _ssd_wide_inputs(d: SSDDims, width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 x, B, C and dt as views into one [b, T, width] tensor (like a fused in-projection
    split into pieces), so that element offsets reach b * T * width."""
    values = _ssd_inputs(d, torch.float32, device)
    parent = torch.empty(d.b, d.T, width, device=device)  # columns no view covers stay unread
    cols = {"x": d.H * d.P, "B": d.G * d.N, "C": d.G * d.N, "dt": d.H}
    if sum(cols.values()) > width:
        raise ValueError(f"long_width {width} < the {sum(cols.values())} columns of the inputs")
    out, start = {"A": values["A"]}, 0
    for name, n in cols.items():
        view = parent[..., start : start + n]
        out[name] = view if name == "dt" else view.unflatten(-1, values[name].shape[2:])
        out[name].copy_(values[name])
        start += n
    return out


def _ssd_call(L: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(fn(t["x"], t["dt"], t["A"], t["B"], t["C"], L))

    return call


def ssd_checks(plan: Plan, device: torch.device) -> list[Check]:
    """fp32 and bf16 at each correctness shape, then the long case (fp32 vs fp32 chunked)."""
    checks = []
    for label, d in plan.ssd_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            tol = {"*": TOLERANCE[_dtype_name(dtype)]}
            if dtype == torch.bfloat16:
                tol["dA"] = TOLERANCE_SSD_BF16_DA
            checks.append(
                Check(
                    f"ssd {label} {_dtype_name(dtype)}",
                    "ssd",
                    _dtype_name(dtype),
                    dataclasses.asdict(d),
                    partial(_ssd_inputs, d, dtype, device),
                    ("x", "dt", "A", "B", "C"),
                    ("y", "final_state"),
                    _ssd_call(d.L),
                    partial(_ssd_call(d.L), ssd_scan_chunked),
                    torch.float64,
                    tol,
                )
            )
    if plan.ssd_long is not None:
        d, width = plan.ssd_long, plan.long_width
        past_int32 = d.b * d.T * width - 1 > INT32_MAX
        dims = dataclasses.asdict(d) | {"row_width": width, "offsets_past_int32": past_int32}
        checks.append(
            Check(
                f"ssd long T={d.T} (wide rows) float32",
                "ssd",
                "float32",
                dims,
                partial(_ssd_wide_inputs, d, width, device),
                ("x", "dt", "A", "B", "C"),
                ("y", "final_state"),
                _ssd_call(d.L),
                partial(_ssd_call(d.L), ssd_scan_chunked),
                torch.float32,
                {"*": TOLERANCE_LONG},
            )
        )
    return checks


def _pkm_inputs(d: PKMDims, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """benchmarks/kernels.py's PKM inputs (uniform rows, softmax weights), table in ``dtype``."""
    inputs = pkm_case(d, torch.device("cpu"), torch.Generator().manual_seed(0)).inputs
    return {k: v.to(device, dtype if k == "values" else v.dtype) for k, v in inputs.items()}


def _pkm_call(deterministic: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (fn(t["values"], t["indices"], t["weights"], deterministic=deterministic),)

    return call


def _pkm_ref(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (pkm_lookup_ref(t["values"], t["indices"], t["weights"]),)


def pkm_checks(plan: Plan, device: torch.device) -> list[Check]:
    """Both value-gradient paths (atomic and sorted) at each shape, fp32 and bf16 tables."""
    checks = []
    for label, d in plan.pkm_shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for det in (False, True):
                checks.append(
                    Check(
                        f"pkm {label} {_dtype_name(dtype)} {'sorted' if det else 'atomic'}",
                        "pkm",
                        _dtype_name(dtype),
                        dataclasses.asdict(d) | {"deterministic": det},
                        partial(_pkm_inputs, d, dtype, device),
                        ("values", "weights"),
                        ("out",),
                        _pkm_call(det),
                        _pkm_ref,
                        torch.float64,
                        {"*": TOLERANCE[_dtype_name(dtype)]},
                    )
                )
    return checks


CHECK_BUILDERS: dict[str, Callable[[Plan, torch.device], list[Check]]] = {
    "ssd": ssd_checks,
    "pkm": pkm_checks,
}


def _outputs_and_grads(
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    inputs: dict[str, torch.Tensor],
    grad_names: tuple[str, ...],
    dtype: torch.dtype | None,
    cotangents: list[torch.Tensor] | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """Outputs, gradients of sum(out * cotangent) w.r.t. ``grad_names``, and the cotangents.

    Floating inputs are cast to ``dtype`` first (None: as given; strides survive when the dtype
    does not change). Cotangents, when not given, are drawn in each output's own dtype, so that
    a reference run in fp64 gets exactly the values the kernel got.
    """
    leaves = {}
    for k, v in inputs.items():
        t = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        leaves[k] = t.detach().requires_grad_() if k in grad_names else t
    outs = fn(leaves)
    if cotangents is None:
        gen = torch.Generator().manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    objective = sum((o.double() * c.double()).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(
        objective, [leaves[k] for k in grad_names], allow_unused=True, materialize_grads=True
    )
    return tuple(o.detach() for o in outs), grads, cotangents


def _tensor_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """benchmarks/kernels.py's max |got - ref| / max |ref|; inf if the kernel left non-finite
    values (an unwritten or wrongly addressed element)."""
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return _rel_err(got, ref)


def run_check(check: Check, kernel_fn: Callable[..., Any]) -> dict[str, Any]:
    """Kernel and reference on the same inputs and cotangents; errors against tolerances."""
    row: dict[str, Any] = {
        "name": check.name,
        "op": check.op,
        "dtype": check.dtype,
        "dims": check.dims,
        "reference_dtype": _dtype_name(check.ref_dtype),
    }
    t0 = time.perf_counter()
    try:
        inputs = check.make_inputs()
        kernel = partial(check.kernel, kernel_fn)
        outs, grads, cots = _outputs_and_grads(kernel, inputs, check.grad_names, None, None)
        ref_outs, ref_grads, _ = _outputs_and_grads(
            check.reference, inputs, check.grad_names, check.ref_dtype, cots
        )
    except Exception as err:  # noqa: BLE001 - a crashing kernel is a result, not the end of the run
        return row | {"status": "error", "error": _error_text(err)}
    names = [*check.out_names, *(f"d{n}" for n in check.grad_names)]
    errors = {
        name: _tensor_err(g, r)
        for name, g, r in zip(names, [*outs, *grads], [*ref_outs, *ref_grads])
    }
    tol = {name: check.tolerance.get(name, check.tolerance["*"]) for name in names}
    worst = max(names, key=lambda n: errors[n] / tol[n])
    return row | {
        "status": "ok",
        "pass": all(errors[n] <= tol[n] for n in names),
        "max_rel_err": errors,
        "tolerance": tol,
        "worst": worst,
        "worst_over_tol": errors[worst] / tol[worst],
        "seconds": time.perf_counter() - t0,
    }


def _triton_kernel(op: str, device: torch.device, interpret_ok: bool) -> Callable[..., Any]:
    """The op's Triton function, or ``Unavailable`` saying why it cannot run here."""
    if device.type == "cpu" and not interpret_ok:
        raise Unavailable(
            "triton was imported before TRITON_INTERPRET=1 could be set, so its CPU interpreter"
            " cannot run in this process"
        )
    problem = backend_problem(op, "triton", device)
    if problem:
        raise Unavailable(problem)
    module, attr = TRITON_MODULES[op]
    return getattr(importlib.import_module(module), attr)


def section_correctness(plan: Plan, device: torch.device, interpret_ok: bool) -> dict[str, Any]:
    """Every op of TRITON_MODULES: its checks, or one error row if it has none."""
    planned: list[tuple[Check | None, str, Callable[..., Any] | None, str | None]] = []
    for op, (module, attr) in TRITON_MODULES.items():
        if op not in CHECK_BUILDERS:
            planned.append((None, op, None, f"no correctness check for {module}.{attr}"))
            continue
        try:
            fn, why = _triton_kernel(op, device, interpret_ok), None
        except Unavailable as err:
            fn, why = None, str(err)
        planned += [(check, op, fn, why) for check in CHECK_BUILDERS[op](plan, device)]
    cases = []
    for check, op, fn, why in tqdm(planned, desc="a correctness", file=sys.stderr, disable=None):
        if check is None:
            cases.append({"name": op, "op": op, "status": "error", "error": why})
        elif fn is None:
            cases.append({"name": check.name, "op": op, "status": "skipped", "reason": why})
        else:
            cases.append(run_check(check, fn))
            _free(device)
    ran = [c for c in cases if c["status"] == "ok"]
    failed = [c["name"] for c in cases if c["status"] == "error" or not c.get("pass", True)]
    return {
        "status": "ok",
        "pass": False if failed else (True if ran else None),
        "failed": failed,
        "counts": {s: sum(c["status"] == s for c in cases) for s in ("ok", "skipped", "error")},
        "cases": cases,
    }


# ----------------------------------------------------------------------------- b: SSD timing


def _bandwidth_floor(row: dict[str, Any], roof: dict[str, Any]) -> dict[str, Any]:
    """Bytes / copy bandwidth, and the time as % of it (benchmarks/kernels.py counts the bytes)."""
    if row.get("status") != "ok":
        return row
    floor_ms = row["bytes"] / (roof["copy_gbps"] * 1e9) * 1e3
    return row | {"bw_floor_ms": floor_ms, "pct_bw_floor": 100 * floor_ms / row["ms"]}


def section_ssd_timing(plan: Plan, device: torch.device) -> dict[str, Any]:
    """Triton vs mamba_ssm fwd+bwd per shape, through benchmarks/kernels.py's ``run_backend``
    (mamba_ssm is reached via ``kernels.ssd.op``, whose loader skips mamba_ssm's __init__)."""
    timing = plan.timing or plan_for(device, quick=False)
    roof = measure_roofline(device, quick=plan.timing is not None)
    target = Target(device, interpret=device.type == "cpu")
    rows = []
    for label, d in tqdm(plan.timing_shapes, desc="b ssd timing", file=sys.stderr, disable=None):
        case = ssd_case(d, device, torch.Generator().manual_seed(0))
        ours, result = run_backend(case, "triton", "fwd+bwd", target, timing, roof, None)
        # mamba_ssm's gradients are compared with ours (rel_err), not with a third reference
        theirs, _ = run_backend(case, "mamba_ssm", "fwd+bwd", target, timing, roof, result)
        del case, result
        _free(device)
        both = ours["status"] == "ok" and theirs["status"] == "ok"
        rows.append(
            {
                "shape": label,
                "dims": dataclasses.asdict(d),
                "input_dtype": "bfloat16" if device.type == "cuda" else "float32",
                "triton": _bandwidth_floor(ours, roof),
                "mamba_ssm": _bandwidth_floor(theirs, roof),
                "mamba_ms_over_ours": theirs["ms"] / ours["ms"] if both else None,
            }
        )
    plan_used = dataclasses.asdict(timing)
    return {"status": "ok", "roofline": roof, "timing_plan": plan_used, "rows": rows}


# ----------------------------------------------------------------------------- c: throughput


def section_throughput(plan: Plan, device: torch.device) -> dict[str, Any]:
    """fwd+bwd tokens/s of each config at each length (throughput.py's cells and ratios)."""
    lengths = list(plan.lengths)
    subjects = [build_subject(p, list(plan.overrides), lengths, device, 0) for p in plan.configs]
    args = argparse.Namespace(
        tokens_per_step=plan.tokens_per_step, warmup=plan.warmup, repeats=plan.repeats
    )
    records = []
    cells = [(length, s) for length in lengths for s in subjects]
    for length, subject in tqdm(cells, desc="c throughput", file=sys.stderr, disable=None):
        records.append(measure_cell(subject, "fwd+bwd", length, args, device))
    baseline = next(s.name for s in subjects if s.cfg.model.family == "transformer")
    models = {
        s.name: {
            "family": s.cfg.model.family,
            "params": sum(p.numel() for p in s.model.parameters()),
            "kernel_backends": s.backends,
        }
        for s in subjects
    }
    return {
        "status": "ok",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "tokens_per_step": plan.tokens_per_step,
        "overrides": list(plan.overrides),
        "baseline": baseline,
        "target_length": plan.target_length,
        "models": models,
        "results": records,
        "ratios": compute_ratios(records, baseline),
    }


# ----------------------------------------------------------------------------- d: train step


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The table's peak for this GPU name, or None (CPU, NVL variants, GPUs not in the table)."""
    if "NVL" in device_name:
        return None
    return next((v for k, v in DENSE_BF16_PEAK_TFLOPS.items() if k in device_name), None)


def _single_device_overrides(plan: Plan, compile_blocks: bool) -> list[str]:
    layout = ["parallel.backend=none", "parallel.dp_replicate=1", "parallel.dp_shard=-1"]
    train = [
        f"train.seq_len={plan.big_seq_len}",
        "train.activation_checkpointing=true",
        f"train.compile={str(compile_blocks).lower()}",
        "checkpoint.enabled=false",
    ]
    return [*plan.big_overrides, *layout, "parallel.ep=1", *train]


def build_train_step(
    plan: Plan, device: torch.device, batch: int | None, compile_blocks: bool
) -> dict[str, Any]:
    """The model, engine and one-step closure, built the trainer's way (``pretrain.build``)."""
    from parallel.dist import DistInfo
    from pretrain.backend import iter_after_step_hooks, resolve_backend
    from pretrain.build import build_mesh, build_training_model

    trainer_compiles = compile_blocks and plan.compile == "trainer"
    overrides = _single_device_overrides(plan, trainer_compiles)
    if batch is not None:
        overrides.append(f"train.batch_size={batch}")
    cfg = load_run_config(plan.big_config, overrides, plan.big_seq_len)
    info = DistInfo(device=device)
    mesh = build_mesh(cfg, info)
    info = info.with_mesh(mesh)
    model = build_training_model(cfg, info, compiled=compile_blocks)
    model.set_active_paths(PATH_NAMES)  # every component on: the last curriculum stage
    flops = count_flops(model, plan.big_seq_len, training=True)
    engine = resolve_backend(cfg.parallel.backend).build_engine(model, cfg, mesh, info)
    if compile_blocks and not trainer_compiles:  # the same per-block compile, another backend
        for block in model.blocks.values():
            block.compile(backend=plan.compile)
    b, L, vocab = cfg.train.batch_size, plan.big_seq_len, cfg.model.vocab_size
    hooks = list(iter_after_step_hooks(model))

    def step() -> None:
        ids = torch.randint(vocab, (b, L + 1), device=device)
        on_gpu = device.type == "cuda"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            out = engine.module(ids[:, :-1])
        engine.backward(lm_loss(out.logits, ids[:, 1:]) + out.aux_loss)
        engine.clip_grad_norm(cfg.train.grad_clip)
        engine.step()
        for hook in hooks:
            hook(True)

    return {"cfg": cfg, "model": model, "engine": engine, "flops": flops, "step": step, "batch": b}


def measure_train_step(plan: Plan, device: torch.device, built: dict[str, Any]) -> dict[str, Any]:
    """First step (compiles), median of the timed steps, peak memory, FLOP rate and MFU."""
    step, b, L = built["step"], built["batch"], plan.big_seq_len
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - t0
    seconds = median_seconds(step, device, plan.big_repeats, warmup=plan.big_warmup - 1)
    peak = peak_bytes(step, device)  # one more step: bytes above what was live before it
    per_token = built["flops"].model_train_per_token  # MFU counts model FLOPs (3x forward)
    tokens_per_s = b * L / seconds
    achieved = per_token * tokens_per_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = dense_bf16_peak_tflops(name) if device.type == "cuda" else None
    model = built["model"]
    return {
        "batch": b,
        "seq_len": L,
        "tokens_per_step": b * L,
        "first_step_s": first_s,
        "step_s": seconds,
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": per_token,
        "model_tflops": achieved / 1e12,
        "device_name": name,
        "peak_bf16_tflops": peak_tflops,
        "peak_source": "DENSE_BF16_PEAK_TFLOPS" if peak_tflops else f"no entry for {name!r}",
        "mfu": achieved / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_above_start_gib": peak / 2**30,
        "max_memory_allocated_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "params": sum(p.numel() for p in model.parameters()),
        "kernel_backends": _backends_in_use(model),
    }


def _backends_in_use(model: torch.nn.Module) -> dict[str, str]:
    """op -> backend, read from the modules ``apply_kernel_backends`` pointed (what really runs)."""
    return {
        type(m).kernel_op: m.kernel_backend
        for m in model.modules()
        if getattr(type(m), "kernel_op", None)
    }


def measure_path(plan: Plan, device: torch.device, compile_blocks: bool) -> dict[str, Any]:
    """One build-and-measure of the big model; on out-of-memory the batch is halved and the
    attempt recorded. Any other failure is returned as ``status: error``."""
    attempts: list[dict[str, Any]] = []
    batch, result = plan.big_batch, None
    while result is None:
        built = None
        try:
            built = build_train_step(plan, device, batch, compile_blocks)
            result = {"status": "ok"} | measure_train_step(plan, device, built)
        except torch.OutOfMemoryError as err:
            b = built["batch"] if built else batch
            attempts.append({"batch": b, "error": _error_text(err)})
            if b is None or b <= 1:
                result = {"status": "error", "error": _error_text(err)}
            batch = None if b is None else b // 2
        except Exception as err:  # noqa: BLE001 - recorded; the eager path may still run
            result = {"status": "error", "error": _error_text(err)}
            result["traceback"] = traceback.format_exc()[-3000:]
        finally:
            del built
            if compile_blocks:
                torch._dynamo.reset()  # compiled graphs hold the model
            _free(device)
    return result | {"oom_attempts": attempts}


def section_train_step(plan: Plan, device: torch.device) -> dict[str, Any]:
    """The big model with per-block compile + activation checkpointing, as ``train.compile`` and
    ``train.activation_checkpointing`` give it; if that path fails, the same step without
    compile (activation checkpointing on), so the run still reports a measured MFU."""
    if plan.compile == "off":
        why = "compile off in this plan (--smoke-compile turns it on with aot_eager)"
        paths = {"compiled": {"status": "skipped", "reason": why}}
    else:
        paths = {"compiled": measure_path(plan, device, compile_blocks=True)}
    if paths["compiled"]["status"] != "ok":
        paths["eager"] = measure_path(plan, device, compile_blocks=False)
    measured = next((name for name, r in paths.items() if r["status"] == "ok"), None)
    head = {
        "status": "ok" if measured else "error",
        "config": plan.big_config,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "activation_checkpointing": True,
        "compile": "torch.compile per block (the trainer's train.compile)"
        if plan.compile == "trainer"
        else plan.compile,
        "step": "forward, fp32 loss + MoE aux, backward, grad clip, AdamW, routing-bias hooks",
        "measured_path": measured,
        "paths": paths,
    }
    if measured is None:
        head["error"] = "; ".join(
            f"{n}: {r.get('error', r.get('reason'))}" for n, r in paths.items()
        )
        return head
    figures = {k: v for k, v in paths[measured].items() if k not in ("status", "traceback")}
    return head | figures


# ----------------------------------------------------------------------------- targets, report


def _target(name: str, value: float | None, threshold: float, ok: bool | None) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "pass": ok}


def _ge(value: float | None, threshold: float) -> bool | None:
    return None if value is None else value >= threshold


def evaluate_targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and pass/fail (None: not measured in this run)."""
    out = []
    a = sections.get("correctness", {})
    if a.get("status") == "ok":
        out.append(_target("every Triton kernel within tolerance", None, 0.0, a["pass"]))
    speed, floor = TARGETS["ssd_vs_mamba_ssm"], TARGETS["ssd_pct_bandwidth_floor"]
    for row in sections.get("ssd_timing", {}).get("rows", []):
        ratio, pct = row["mamba_ms_over_ours"], row["triton"].get("pct_bw_floor")
        label = f"ssd {row['shape']}"
        out.append(_target(f"{label}: mamba_ssm ms / ours", ratio, speed, _ge(ratio, speed)))
        out.append(_target(f"{label}: % of bandwidth floor", pct, floor, _ge(pct, floor)))
    c = sections.get("throughput", {})
    if c.get("status") == "ok":
        out += _throughput_targets(c)
    d = sections.get("train_step", {})
    if d.get("status") == "ok":
        name = f"{Path(d['config']).stem} MFU ({d['measured_path']} path)"
        mfu = TARGETS["mfu_1p6b"]
        out.append(_target(name, d["mfu"], mfu, _ge(d["mfu"], mfu)))
    return out


def _throughput_targets(c: dict[str, Any]) -> list[dict[str, Any]]:
    hydra = {
        r["length"]: r["measured"]
        for r in c["ratios"]
        if r["config"].startswith("hydra") and r["mode"] == "fwd+bwd"
    }
    at = hydra.get(c["target_length"])
    series = [hydra[length] for length in sorted(hydra)]
    growing = None if None in series else all(a < b for a, b in zip(series, series[1:]))
    threshold = TARGETS["hydra_over_transformer"]
    return [
        _target(
            f"hydra / transformer tokens/s at L={c['target_length']}",
            at,
            threshold,
            _ge(at, threshold),
        ),
        _target("hydra / transformer ratio grows with L", None, 0.0, growing),
    ]


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def _rows_for_print(report: dict[str, Any]) -> list[list[str]]:
    """One line per section and per headline figure."""
    rows = []
    for key, sec in report["sections"].items():
        status = sec.get("status", "?")
        note = sec.get("error") or sec.get("reason") or ""
        rows.append([key, status, _fmt(sec.get("seconds"), ".1f"), note[:90]])
        if key == "correctness" and status == "ok":
            for case in sec["cases"]:
                if case["status"] == "ok":
                    detail = f"worst err/tol {_fmt(case['worst_over_tol'])} ({case['worst']})"
                    rows.append(["", case["name"], _pass(case["pass"]), detail])
                else:
                    why = case.get("reason") or case.get("error") or ""
                    rows.append(["", case["name"], case["status"], why[:110]])
        if key == "ssd_timing" and status == "ok":
            for r in sec["rows"]:
                ours, theirs = r["triton"], r["mamba_ssm"]
                text = (
                    f"ours {_fmt(ours.get('ms'))} ms ({_fmt(ours.get('pct_bw_floor'), '.0f')}%"
                    f" bw floor), mamba_ssm {_fmt(theirs.get('ms'))} ms"
                    f" {theirs.get('reason', '')}"
                )
                rows.append(["", r["shape"], _fmt(r["mamba_ms_over_ours"], ".2f"), text[:110]])
        if key == "throughput" and status == "ok":
            for r in sec["results"]:
                value = _fmt(r.get("tokens_per_s"), ",.0f")
                rows.append(["", f"{r['config']} L={r['length']}", value, r.get("error", "")])
        if key == "train_step" and status == "ok":
            text = (
                f"{_fmt(sec['tokens_per_s'], ',.0f')} tok/s, {_fmt(sec['model_tflops'])} TFLOP/s,"
                f" MFU {_fmt(sec['mfu'])}, peak {_fmt(sec['peak_above_start_gib'])} GiB"
            )
            rows.append(
                ["", f"{sec['measured_path']} b={sec['batch']} L={sec['seq_len']}", "ok", text]
            )
            for name, path in sec["paths"].items():
                if path["status"] != "ok":
                    why = path.get("error") or path.get("reason", "")
                    rows.append(["", f"{name} path", path["status"], why[:110]])
    for t in report.get("targets", []):
        rows.append(["target", t["name"], _pass(t["pass"]), _fmt(t["value"])])
    return rows


def _pass(ok: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "n/a"}[ok]


def print_table(report: dict[str, Any]) -> None:
    """Plain text columns (the GPU machines need not have rich)."""
    rows = [["section", "item", "result", "detail"], *_rows_for_print(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    m = report["machine"]
    print(f"\ngpu_check on {m['device_name']} ({m['device']}), smoke={report['smoke']}")
    if report["smoke"]:
        print("smoke run: every figure and target verdict below is meaningless")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])


# ----------------------------------------------------------------------------- main


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:ERROR_CHARS]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one timed run")
    p.add_argument("--sections", default="a,b,c,d", help="subset of a,b,c,d (or their names)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "gpu_check.json")
    p.add_argument(
        "--smoke-compile",
        action="store_true",
        help="with --smoke: also the compiled train step, blocks compiled with aot_eager",
    )
    args = p.parse_args(argv)
    names = {**SECTIONS, **{v: v for v in SECTIONS.values()}}
    picked = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in picked if s not in names]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from a,b,c,d or {list(SECTIONS.values())}")
    args.sections = [names[s] for s in picked]
    return args


def _prepare_device(device: torch.device) -> bool:
    """CUDA: refuse the interpreter, lift dynamo's recompile limit. CPU: turn Triton's
    interpreter on if triton is not imported yet. Returns whether interpreted Triton can run."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke)")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("TRITON_INTERPRET=1 would time Triton's CPU interpreter: unset it")
        _raise_recompile_limit()
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    interpret_ok = _prepare_device(device)
    plan = smoke_plan() if args.smoke else full_plan()
    if args.smoke and args.smoke_compile:
        plan = dataclasses.replace(plan, compile="aot_eager")
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "correctness": partial(section_correctness, plan, device, interpret_ok),
        "ssd_timing": partial(section_ssd_timing, plan, device),
        "throughput": partial(section_throughput, plan, device),
        "train_step": partial(section_train_step, plan, device),
    }
    report: dict[str, Any] = {
        "complete": False,
        "smoke": args.smoke,
        "notes": list(plan.notes),
        "machine": machine_info(device) | {"triton_interpreter": device.type == "cpu"},
        "tolerances": TOLERANCE | {"ssd_bf16_dA": TOLERANCE_SSD_BF16_DA, "long": TOLERANCE_LONG},
        "sections": {},
        "targets": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            result = runners[name]()
        except Exception as err:  # noqa: BLE001 - one broken section must not stop the others
            result = {"status": "error", "error": _error_text(err)}
            result["traceback"] = traceback.format_exc()[-3000:]
        _free(device)
        report["sections"][name] = result | {"seconds": time.perf_counter() - t0}
        report["targets"] = evaluate_targets(report["sections"])
        args.out.write_text(json.dumps(report, indent=2, default=str))
    report.update(complete=True, total_seconds=time.perf_counter() - start)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
