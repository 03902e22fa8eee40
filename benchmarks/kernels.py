"""Kernel benchmark: every available backend of each op, timed against a measured roofline.

Run:  python benchmarks/kernels.py --device cuda --shapes 29m,1.6b --out kernels_cuda.json
      python benchmarks/kernels.py --device cpu --quick            (smoke test; numbers mean nothing)

Ops and modes (shapes from ``configs/hydra-<name>.yaml``, batch x seq per preset below):
  ssd        Mamba-2 chunked scan            fwd, fwd+bwd   torch | triton | mamba_ssm
  pkm        weighted bag of value rows      fwd, fwd+bwd   torch | triton | triton_det
  moe        dropless SwiGLU expert compute  fwd, fwd+bwd   torch | grouped_mm | megablocks
  attention  sparse global attention         fwd, fwd+bwd   torch | flex | flash_attn

Each (op, mode, backend) is run once untimed and its forward output compared with the torch
backend's (``rel_err`` = max |out - ref| / max |ref|), then timed: the median of many runs, with
CUDA events on the GPU and ``time.perf_counter`` (fewer runs) on the CPU. The roofline comes from
the same run: ``matmul_tflops`` from a large dense matmul (bf16 on CUDA, fp32 on CPU, the dtypes
the ops run in) and ``copy_gbps`` from a large device-to-device copy (bytes read + written).
For each case ``floor_ms = max(flops / matmul rate, bytes / copy bandwidth)`` with flops and bytes
counted per op below, and ``pct_floor = floor_ms / ms``: 100% means the kernel runs at the floor.

A backend that cannot run (package not importable, no CUDA, Triton on CPU without
``--interpret``, FlexAttention's backward on CPU, where only its eager forward runs) is skipped
with its reason; one that fails is reported with its error. Neither stops the run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, where this very file would shadow the
    # project's ``kernels`` package: look in the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))

from pretrain.models.config import AttentionConfig, MoEConfig, PKMConfig, SSMConfig  # noqa: E402

OPS = ("ssd", "pkm", "moe", "attention")
MODES = ("fwd", "fwd+bwd")
# preset -> (batch, seq_len, quick batch, quick seq_len): chosen so that one layer's activations
# fit on an 80 GB GPU with room to spare (29m: a training micro-batch; 1.6b: one long row)
PRESETS = {"tiny": (2, 256, 1, 64), "29m": (8, 2048, 1, 256), "1.6b": (1, 8192, 1, 256)}


class Unavailable(Exception):
    """A backend that cannot run here; the message says why."""


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class SSDDims:
    b: int  # batch
    T: int  # time
    H: int  # heads
    P: int  # head dim
    N: int  # state size
    G: int  # B/C groups
    L: int  # chunk length


@dataclass(frozen=True)
class PKMDims:
    n: int  # bags (tokens)
    k: int  # rows per bag (heads * top_k)
    R: int  # value rows
    Dv: int  # value size


@dataclass(frozen=True)
class MoEDims:
    n: int  # tokens
    k: int  # experts per token
    E: int  # experts
    D: int  # model dim
    F: int  # expert hidden dim
    C: int  # routing chunk


@dataclass(frozen=True)
class AttnDims:
    b: int
    T: int
    H: int  # query heads
    Hkv: int  # key/value heads
    K: int  # head dim
    window: int
    n_global: int
    chunk: int  # summary chunk


@dataclass(frozen=True)
class Shapes:
    """The op dimensions of one model config at one batch x seq_len."""

    name: str
    batch: int
    seq_len: int
    ssd: SSDDims
    pkm: PKMDims
    moe: MoEDims
    attention: AttnDims


def _model_section(spec: str) -> tuple[str, dict[str, Any]]:
    """Name and ``model:`` section of a preset name (configs/hydra-<name>.yaml) or a YAML path."""
    path = (
        Path(spec) if spec.endswith((".yaml", ".yml")) else REPO / "configs" / f"hydra-{spec}.yaml"
    )
    if not path.is_file():
        raise SystemExit(f"no config for shapes {spec!r}: {path} does not exist")
    with open(path) as f:
        model = yaml.safe_load(f).get("model", {})
    return (spec if spec in PRESETS else path.stem), model


def load_shapes(spec: str, quick: bool, batch: int | None, seq_len: int | None) -> Shapes:
    """Derive every op's dimensions from a model config, as the model modules do."""
    name, m = _model_section(spec)
    pb, pt, qb, qt = PRESETS.get(name, (1, min(2048, m.get("max_seq_len", 2048)), 1, 256))
    b = batch or (qb if quick else pb)
    T = seq_len or (qt if quick else pt)
    d_model = m.get("d_model", 128)
    ssm = SSMConfig(**m.get("ssm", {}))
    att = AttentionConfig(**m.get("attention", {}))
    moe = MoEConfig(**m.get("moe", {}))
    pkm = PKMConfig(**m.get("pkm", {}))
    n_heads = ssm.expand * d_model // ssm.head_dim
    return Shapes(
        name=name,
        batch=b,
        seq_len=T,
        ssd=SSDDims(b, T, n_heads, ssm.head_dim, ssm.d_state, ssm.n_groups, ssm.chunk_size),
        pkm=PKMDims(b * T, pkm.n_heads * pkm.top_k, pkm.n_subkeys**2, pkm.d_value or d_model),
        moe=MoEDims(b * T, moe.top_k, moe.n_experts, d_model, moe.d_expert, moe.chunk_size),
        attention=AttnDims(
            b,
            T,
            att.n_heads,
            att.n_kv_heads or att.n_heads,
            d_model // att.n_heads,
            att.window,
            att.n_global,
            att.summary_chunk,
        ),
    )


# ----------------------------------------------------------------------------- FLOP and byte counts
# FLOPs count multiply and add separately (2 per MAC) for the matmul work of each algorithm;
# elementwise work (exp, softmax, silu) is left out. Bytes count the compulsory traffic of an ideal
# fused kernel: inputs read once, outputs written once, no intermediates (anything more is the
# kernel's own cost and shows up as a lower pct_floor).


def ssd_flops(d: SSDDims, mode: str) -> float:
    """Chunked SSD: C.B per chunk, (CB o decay) @ x, chunk states, state readout.

    The [L, L] products are causal (half the tile). The backward of a matmul chain is two matmuls
    per forward matmul, so fwd+bwd = 3x fwd.
    """
    cb = d.b * d.T * d.L * d.G * d.N  # 2 * (L/2) * N per (t, group)
    intra = d.b * d.T * d.L * d.H * d.P  # 2 * (L/2) * P per (t, head)
    states = 2 * d.b * d.T * d.H * d.P * d.N  # B^T (w x): 2 * P * N per (t, head)
    readout = 2 * d.b * d.T * d.H * d.P * d.N  # C . state: 2 * P * N per (t, head)
    passing = 2 * d.b * math.ceil(d.T / d.L) * d.H * d.P * d.N
    fwd = cb + intra + states + readout + passing
    return fwd if mode == "fwd" else 3 * fwd


def ssd_bytes(d: SSDDims, mode: str, act: int) -> float:
    """x, dt, B, C in, y out (+ fp32 final state); bwd reads them and dy, writes dx, ddt, dB, dC."""
    x = d.b * d.T * d.H * d.P * act
    dt = d.b * d.T * d.H * 4
    bc = 2 * d.b * d.T * d.G * d.N * act
    state = d.b * d.H * d.P * d.N * 4
    fwd = x + dt + bc + x + state
    bwd = (x + dt + bc) + x + (x + dt + bc)
    return fwd if mode == "fwd" else fwd + bwd


def pkm_flops(d: PKMDims, mode: str) -> float:
    """fwd: a multiply-add per gathered element; bwd: grad_weights (dot) + grad_values (axpy)."""
    fwd = 2 * d.n * d.k * d.Dv
    return fwd if mode == "fwd" else 3 * fwd


def pkm_bytes(d: PKMDims, mode: str, val: int, rows_read: int) -> float:
    """Compulsory traffic: each distinct row read once (``rows_read`` of the R rows).

    fwd: those rows + indices (int64) + weights (fp32) + out. bwd: the rows again (for
    grad_weights), grad_out, grad_weights, and the dense [R, Dv] value gradient written once.
    A gather kernel that re-reads a row for every (bag, slot) pair moves n * k * Dv elements
    instead; when the table does not fit in L2 (1.6b: 512 MiB) that puts it far above this floor.
    """
    pairs = d.n * d.k
    fwd = rows_read * d.Dv * val + pairs * (8 + 4) + d.n * d.Dv * val
    bwd = rows_read * d.Dv * val + pairs * (8 + 4) + d.n * d.Dv * val + pairs * 4 + d.R * d.Dv * val
    return fwd if mode == "fwd" else fwd + bwd


def moe_flops(d: MoEDims, mode: str) -> float:
    """Three [D, F] matmuls per (token, slot) pair; fwd+bwd = 3x fwd."""
    fwd = 3 * 2 * d.n * d.k * d.D * d.F
    return fwd if mode == "fwd" else 3 * fwd


def moe_bytes(d: MoEDims, mode: str, act: int) -> float:
    """Expert weights + x + routing in, y out; bwd: weights, x, dy in, dW, dx, dweights out."""
    weights = 3 * d.E * d.D * d.F * act
    x = d.n * d.D * act
    route = d.n * d.k * (8 + 4)
    fwd = weights + x + route + x
    bwd = weights + 2 * x + route + weights + x + d.n * d.k * 4
    return fwd if mode == "fwd" else fwd + bwd


def attention_pairs(d: AttnDims) -> int:
    """(query, key) pairs the op scores per row and head: its window plus its visible summaries."""
    t = torch.arange(d.T, dtype=torch.float64)
    local = torch.clamp(t + 1, max=d.window)
    # summaries of complete chunks ending at or before t - window; the most recent n_global kept
    completed = torch.clamp(torch.floor((t - d.window + 1) / d.chunk), min=0)
    return int((local + torch.clamp(completed, max=d.n_global)).sum().item())


def attention_flops(d: AttnDims, mode: str) -> float:
    """QK^T and PV: 4 * K per visible pair; the backward is 5 matmuls for 2 (fwd+bwd = 3.5x)."""
    fwd = 4 * d.b * d.H * d.K * attention_pairs(d)
    return fwd if mode == "fwd" else 3.5 * fwd


def attention_bytes(d: AttnDims, mode: str, act: int) -> float:
    """q, k, v, summaries in, out; bwd: q, k, v, out, dout in, dq, dk, dv out."""
    q = d.b * d.T * d.H * d.K * act
    kv = 2 * d.b * d.T * d.Hkv * d.K * act
    summ = 2 * d.b * math.ceil(d.T / d.chunk) * d.Hkv * d.K * act
    fwd = q + kv + summ + q
    bwd = (q + kv + summ + 2 * q) + (q + kv + summ)
    return fwd if mode == "fwd" else fwd + bwd


# ----------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One op at one shape: inputs, the forward as a function of them, and cost counts."""

    op: str
    dims: Any
    inputs: dict[str, torch.Tensor]
    grad_names: tuple[str, ...]  # inputs differentiated in fwd+bwd
    call: Callable[[Callable[..., Any], dict[str, torch.Tensor]], torch.Tensor]
    flops: Callable[[str], float]
    bytes: Callable[[str], float]


def _act_dtype(device: torch.device) -> torch.dtype:
    """Activations as training runs them: bf16 autocast on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ssd_case(d: SSDDims, device: torch.device, gen: torch.Generator) -> Case:
    act = _act_dtype(device)

    def rnd(*shape: int, dtype: torch.dtype = act, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = {
        "x": rnd(d.b, d.T, d.H, d.P),
        # dt after softplus in the trained range, A < 0 (the module keeps both in fp32)
        "dt": F.softplus(rnd(d.b, d.T, d.H, dtype=torch.float32) - 3.0),
        "A": -torch.exp(rnd(d.H, dtype=torch.float32, scale=0.5)),
        "B": rnd(d.b, d.T, d.G, d.N, scale=d.N**-0.5),
        "C": rnd(d.b, d.T, d.G, d.N, scale=d.N**-0.5),
    }

    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], d.L)[0]

    size = torch.finfo(act).bits // 8
    return Case(
        "ssd",
        d,
        inputs,
        ("x", "dt", "A", "B", "C"),
        call,
        lambda m: ssd_flops(d, m),
        lambda m: ssd_bytes(d, m, size),
    )


def pkm_case(d: PKMDims, device: torch.device, gen: torch.Generator) -> Case:
    """fp32 table and weights, as ``ProductKeyMemory`` calls the bag (autocast off).

    Rows are drawn uniformly (a memory with good key usage); weights a softmax per bag.
    """
    indices = torch.randint(0, d.R, (d.n, d.k), generator=gen)
    rows_read = int(indices.unique().numel())
    inputs = {
        "values": (torch.randn(d.R, d.Dv, generator=gen) * d.Dv**-0.5).to(device),
        "indices": indices.to(device),
        "weights": torch.softmax(torch.randn(d.n, d.k, generator=gen), dim=-1).to(device),
    }

    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(t["values"], t["indices"], t["weights"])

    return Case(
        "pkm",
        d,
        inputs,
        ("values", "weights"),
        call,
        lambda m: pkm_flops(d, m),
        lambda m: pkm_bytes(d, m, 4, rows_read),
    )


def moe_case(d: MoEDims, device: torch.device, gen: torch.Generator) -> Case:
    """Chunk routing: each chunk of C tokens goes to top-k distinct experts (random scores)."""
    act = _act_dtype(device)
    n_chunks = math.ceil(d.n / d.C)
    scores = torch.randn(n_chunks, d.E, generator=gen)
    top, idx = scores.topk(d.k, dim=-1)
    per_token = torch.arange(d.n) // d.C
    std = d.D**-0.5
    inputs = {
        "x": torch.randn(d.n, d.D, generator=gen).to(device, act),
        "expert_idx": idx[per_token].to(device),
        "weights": torch.softmax(top, dim=-1)[per_token].to(device),
        "w1": (torch.randn(d.E, d.D, d.F, generator=gen) * std).to(device, act),
        "w3": (torch.randn(d.E, d.D, d.F, generator=gen) * std).to(device, act),
        "w2": (torch.randn(d.E, d.F, d.D, generator=gen) * d.F**-0.5).to(device, act),
    }

    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return fn(t["x"], t["expert_idx"], t["weights"], t["w1"], t["w3"], t["w2"])

    size = torch.finfo(act).bits // 8
    return Case(
        "moe",
        d,
        inputs,
        ("x", "weights", "w1", "w3", "w2"),
        call,
        lambda m: moe_flops(d, m),
        lambda m: moe_bytes(d, m, size),
    )


def attention_case(d: AttnDims, device: torch.device, gen: torch.Generator) -> Case:
    """q, k, v and chunk summaries (built once, outside the timing, from k and v)."""
    from kernels.attention.ref import ChunkSummaries, build_chunk_summaries

    act = _act_dtype(device)
    q = torch.randn(d.b, d.T, d.H, d.K, generator=gen).to(device, act)
    k = torch.randn(d.b, d.T, d.Hkv, d.K, generator=gen).to(device, act)
    v = torch.randn(d.b, d.T, d.Hkv, d.K, generator=gen).to(device, act)
    summ = build_chunk_summaries(k, v, d.chunk)
    inputs = {
        "q": q,
        "k": k,
        "v": v,
        "sk": summ.k,
        "sv": summ.v,
        "s_start": summ.start,
        "s_end": summ.end,
    }

    def call(fn: Callable[..., Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        s = ChunkSummaries(t["sk"], t["sv"], t["s_start"], t["s_end"])
        return fn(t["q"], t["k"], t["v"], s, window=d.window, n_global=d.n_global)

    size = torch.finfo(act).bits // 8
    return Case(
        "attention",
        d,
        inputs,
        ("q", "k", "v", "sk", "sv"),
        call,
        lambda m: attention_flops(d, m),
        lambda m: attention_bytes(d, m, size),
    )


# ----------------------------------------------------------------------------- backends


def _import(module: str, name: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"{module}.{name} cannot be imported: {err}") from err


@dataclass(frozen=True)
class Target:
    """Where backends run: the device, and whether Triton may use its CPU interpreter."""

    device: torch.device
    interpret: bool = False


Loader = Callable[[Target], Callable[..., Any]]


def _triton_ok(target: Target) -> None:
    if importlib.util.find_spec("triton") is None:
        raise Unavailable("triton is not installed")
    if target.device.type != "cuda" and not target.interpret:
        raise Unavailable(
            "Triton needs CUDA here (--interpret runs it in Triton's CPU interpreter: a"
            " correctness check only)"
        )


def _via_dispatch(op: str, module: str, name: str, backend: str) -> Loader:
    """A backend reached through the project's dispatch (``kernels.<op>.op``), which owns the
    argument mapping of the third-party packages and says why a backend cannot run."""

    def load(target: Target) -> Callable[..., Any]:
        problem = _import("kernels.backends", "backend_problem")(op, backend, target.device)
        if problem:
            raise Unavailable(problem)
        fn = _import(module, name)
        return lambda *args, **kwargs: fn(*args, backend=backend, **kwargs)

    return load


def _flex(target: Target) -> Callable[..., Any]:
    """FlexAttention through the dispatch; on CPU its forward runs eagerly, so time that.

    ``backend_problem`` rejects flex on CPU because training needs the backward, which torch does
    not implement there: fwd+bwd is skipped with that reason when the inputs require grad.
    """
    if target.device.type == "cuda":
        return _via_dispatch(
            "attention", "kernels.attention.op", "sparse_global_attention", "flex"
        )(target)
    _import("torch.nn.attention.flex_attention", "flex_attention")
    fn = _import("kernels.attention.op", "sparse_global_attention")

    def forward_only(*args: Any, **kwargs: Any) -> torch.Tensor:
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
            raise Unavailable("FlexAttention has no backward on CPU (fwd+bwd needs CUDA)")
        return fn(*args, backend="flex", **kwargs)

    return forward_only


def _grouped_mm(target: Target) -> Callable[..., Any]:
    for module in ("kernels.moe.grouped", "kernels.moe.ref", "kernels.moe"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, "moe_experts_grouped_mm"):
            return mod.moe_experts_grouped_mm
    raise Unavailable("moe_experts_grouped_mm not found in kernels.moe")


def _pkm_triton(deterministic: bool) -> Loader:
    def load(target: Target) -> Callable[..., Any]:
        _triton_ok(target)
        fn = _import("kernels.pkm.triton", "pkm_lookup_triton")
        return lambda v, i, w: fn(v, i, w, deterministic=deterministic)

    return load


def _ssd_triton(target: Target) -> Callable[..., Any]:
    _triton_ok(target)
    return _import("kernels.ssd.triton", "ssd_scan_triton")


def _reference(module: str, name: str) -> Loader:
    return lambda target: _import(module, name)


BACKENDS: dict[str, dict[str, Loader]] = {
    "ssd": {
        # what the trainer's torch backend runs (bounded memory, recomputes in backward)
        "torch": _reference("kernels.ssd.chunked", "ssd_scan_bounded"),
        "triton": _ssd_triton,
        "mamba_ssm": _via_dispatch("ssd", "kernels.ssd.op", "ssd_scan", "mamba_ssm"),
    },
    "pkm": {
        "torch": _reference("kernels.pkm.ref", "pkm_lookup_ref"),
        "triton": _pkm_triton(deterministic=False),
        "triton_det": _pkm_triton(deterministic=True),
    },
    "moe": {
        "torch": _reference("kernels.moe.ref", "moe_experts_sorted"),
        "grouped_mm": _grouped_mm,
        "megablocks": _via_dispatch("moe", "kernels.moe.op", "moe_experts", "megablocks"),
    },
    "attention": {
        "torch": _reference("kernels.attention.ref", "sparse_global_attention"),
        "flex": _flex,
        "flash_attn": _via_dispatch(
            "attention", "kernels.attention.op", "sparse_global_attention", "flash_attn"
        ),
    },
}
CASES = {"ssd": ssd_case, "pkm": pkm_case, "moe": moe_case, "attention": attention_case}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TimingPlan:
    """Warm-up runs, then timed runs until ``budget_s`` (at least ``min_runs``, at most ``max_runs``)."""

    warmup: int
    min_runs: int
    max_runs: int
    budget_s: float


def plan_for(device: torch.device, quick: bool) -> TimingPlan:
    if device.type == "cuda":
        return TimingPlan(3, 10, 100, 1.0) if quick else TimingPlan(5, 20, 200, 3.0)
    return TimingPlan(2, 2, 3, 0.5) if quick else TimingPlan(3, 3, 10, 5.0)


def time_ms(fn: Callable[[], Any], device: torch.device, plan: TimingPlan) -> tuple[float, int]:
    """Median milliseconds of ``fn`` and the number of timed runs.

    The last warm-up run is timed roughly to choose how many runs fit the plan's budget.
    """
    for _ in range(max(plan.warmup - 1, 0)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-6)
    runs = int(min(plan.max_runs, max(plan.min_runs, plan.budget_s // once)))
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(runs)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        _sync(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), runs


def measure_roofline(device: torch.device, quick: bool) -> dict[str, Any]:
    """Dense matmul rate (TFLOP/s) and copy bandwidth (GB/s, read + write) of this device."""
    plan = plan_for(device, quick)
    if device.type == "cuda":
        n, dtype, copy_elems = 8192, torch.bfloat16, 1 << 28  # 1 GiB of fp32
    else:
        n, dtype, copy_elems = (1024 if quick else 2048), torch.float32, 1 << (23 if quick else 25)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_ms, _ = time_ms(lambda: a @ b, device, plan)
    src = torch.empty(copy_elems, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_ms, _ = time_ms(lambda: dst.copy_(src), device, plan)
    return {
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "copy_gbps": 2 * copy_elems * 4 / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_elems * 4,
    }


# ----------------------------------------------------------------------------- running


def _step(case: Case, fn: Callable[..., Any], mode: str) -> Callable[[], Any]:
    """A closure running one forward (no autograd; returns the output) or forward + backward
    (returns the gradients of ``case.grad_names`` for a fixed random cotangent)."""
    if mode == "fwd":

        def fwd() -> Any:
            with torch.no_grad():
                return case.call(fn, case.inputs)

        return fwd
    leaves = {
        name: (t.detach().requires_grad_() if name in case.grad_names else t)
        for name, t in case.inputs.items()
    }
    grad_in = [leaves[name] for name in case.grad_names]
    with torch.no_grad():
        out = case.call(fn, case.inputs)
    # the same cotangent for every backend, so their gradients can be compared
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)

    def fwd_bwd() -> Any:
        # an input may not reach the output (no summary is visible in a short sequence): zeros
        out = case.call(fn, leaves)
        return torch.autograd.grad(out, grad_in, cot, allow_unused=True, materialize_grads=True)

    return fwd_bwd


def _rel_err(got: Any, ref: Any) -> float | None:
    """max |got - ref| / max |ref| over the output (fwd) or over each gradient (fwd+bwd)."""
    if ref is None:
        return None
    pairs = zip(got, ref) if isinstance(ref, tuple) else [(got, ref)]
    errs = [
        float((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
        for g, r in pairs
        if r.numel()
    ]
    return max(errs, default=0.0)


def run_backend(
    case: Case,
    backend: str,
    mode: str,
    target: Target,
    plan: TimingPlan,
    roof: dict[str, Any],
    ref: Any,
) -> tuple[dict[str, Any], Any]:
    """One result row, and the backend's untimed result (output or gradients): the torch
    backend's is the reference the others are compared with."""
    row: dict[str, Any] = {"backend": backend, "mode": mode}
    device = target.device
    try:
        step = _step(case, BACKENDS[case.op][backend](target), mode)
        result = step()
        row["rel_err"] = _rel_err(result, ref)
        ms, runs = time_ms(step, device, plan)
    except Unavailable as why:
        return row | {"status": "skipped", "reason": str(why)}, None
    except Exception as err:  # noqa: BLE001 (one broken backend must not stop the benchmark)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row | {"status": "error", "reason": f"{type(err).__name__}: {err}"[:300]}, None
    return row | {"status": "ok"} | roofline_figures(case, mode, ms, roof) | {"runs": runs}, result


def roofline_figures(case: Case, mode: str, ms: float, roof: dict[str, Any]) -> dict[str, Any]:
    """Achieved rates and the floor: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    flops, nbytes = case.flops(mode), case.bytes(mode)
    t_compute = flops / (roof["matmul_tflops"] * 1e12)
    t_memory = nbytes / (roof["copy_gbps"] * 1e9)
    floor_ms = max(t_compute, t_memory) * 1e3
    return {
        "ms": ms,
        "flops": flops,
        "bytes": nbytes,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "gbps": nbytes / (ms * 1e-3) / 1e9,
        "floor_ms": floor_ms,
        "pct_floor": 100 * floor_ms / ms,
        "bound": "compute" if t_compute >= t_memory else "memory",
    }


def run_shape(
    shapes: Shapes,
    ops: list[str],
    target: Target,
    plan: TimingPlan,
    roof: dict[str, Any],
    progress: tqdm,
) -> list[dict[str, Any]]:
    """Result rows of every (op, mode, backend) at one shape; torch runs first as the reference."""
    device = target.device
    rows = []
    for op in ops:
        try:
            case = CASES[op](getattr(shapes, op), device, torch.Generator().manual_seed(0))
        except Exception as err:  # noqa: BLE001 (report it, go on with the other ops)
            case, why = None, f"inputs: {type(err).__name__}: {err}"[:300]
        for mode in MODES:
            ref = None
            for backend in BACKENDS[op]:
                progress.set_postfix_str(f"{shapes.name} {op} {mode} {backend}")
                if case is None:
                    row, result = (
                        {"backend": backend, "mode": mode, "status": "error", "reason": why},
                        None,
                    )
                else:
                    row, result = run_backend(case, backend, mode, target, plan, roof, ref)
                if backend == "torch":
                    ref = result
                rows.append({"shape": shapes.name, "op": op} | row)
                if row["status"] != "ok":
                    progress.write(
                        f"{shapes.name} {op} {mode} {backend}: {row['status']}: {row['reason']}"
                    )
                progress.update()
            del ref
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- report


COLUMNS = (
    "shape",
    "op",
    "mode",
    "backend",
    "ms",
    "TFLOP/s",
    "GB/s",
    "floor ms",
    "% floor",
    "bound",
)


def _cells(row: dict[str, Any]) -> list[str]:
    """Table cells of one row; the last one is rel_err vs torch, or why the row has no time."""
    head = [row["shape"], row["op"], row["mode"], row["backend"]]
    if row["status"] != "ok":
        return head + [row["status"], "", "", "", "", "", row["reason"]]
    err = "" if row.get("rel_err") is None else f"rel_err {row['rel_err']:.1e}"
    return head + [
        f"{row['ms']:.4g}",
        f"{row['tflops']:.3g}",
        f"{row['gbps']:.4g}",
        f"{row['floor_ms']:.4g}",
        f"{row['pct_floor']:.1f}",
        row["bound"],
        err,
    ]


def print_table(report: dict[str, Any]) -> None:
    roof = report["roofline"]
    title = (
        f"{report['device_name']}: matmul {roof['matmul_tflops']:.3g} TFLOP/s"
        f" ({roof['matmul_dtype']}), copy {roof['copy_gbps']:.4g} GB/s"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join((*COLUMNS, "note")))
        for row in report["results"]:
            print(" | ".join(_cells(row)))
        return
    table = Table(title=title)
    for col in COLUMNS:
        left = col in ("shape", "op", "mode", "backend", "bound")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    table.add_column("note", overflow="fold")
    for row in report["results"]:
        table.add_row(*_cells(row))
    Console(width=200).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--shapes", default="29m,1.6b", help="presets (tiny, 29m, 1.6b) or YAML paths")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument("--out", default=None, help="JSON path (default kernels_<device>.json)")
    p.add_argument("--quick", action="store_true", help="short sequences and few runs (smoke test)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    p.add_argument("--seq-len", type=int, default=None, help="override the preset's seq_len")
    p.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, run Triton backends in Triton's interpreter (correctness only)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    if args.interpret and args.device == "cpu":
        # must precede the first import of a Triton kernel module (kernels are built at import)
        os.environ["TRITON_INTERPRET"] = "1"
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {list(OPS)}")
    device = torch.device(args.device)
    target = Target(device, interpret=args.interpret and device.type == "cpu")
    plan = plan_for(device, args.quick)
    specs = [s.strip() for s in args.shapes.split(",") if s.strip()]
    all_shapes = [load_shapes(s, args.quick, args.batch, args.seq_len) for s in specs]
    roof = measure_roofline(device, args.quick)
    n_cases = len(all_shapes) * sum(len(MODES) * len(BACKENDS[op]) for op in ops)
    results: list[dict[str, Any]] = []
    with tqdm(total=n_cases, desc="kernels", file=sys.stderr, disable=None) as progress:
        for shapes in all_shapes:
            results += run_shape(shapes, ops, target, plan, roof, progress)
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "quick": args.quick,
        "interpret": args.interpret,
        "roofline": roof,
        "shapes": {s.name: asdict(s) for s in all_shapes},
        "results": results,
    }
    print_table(report)
    out = Path(args.out or f"kernels_{args.device}.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


def _version(package: str) -> str | None:
    """Installed version, without importing the package (importing triton before
    TRITON_INTERPRET is set would break a later interpreted run in this process)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
