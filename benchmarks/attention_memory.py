"""Peak memory and time of sparse global attention vs full causal attention, forward + backward.

Run:  python benchmarks/attention_memory.py --device cpu --out attention_memory.json

Variants (same weights, same input, batch 1):
  sga          SparseGlobalAttention, one document per row.
  sga_packed   SparseGlobalAttention with ``seq_idx`` (4 equal documents).
  full         CausalSelfAttention, ``scaled_dot_product_attention(is_causal=True)``. PyTorch's
               fused kernels (flash on CPU and CUDA) never hold the L x L matrix either, so its
               memory is linear too; its time is quadratic.
  full_packed  CausalSelfAttention with ``seq_idx``: the block-diagonal causal mask is L x L.

Peak memory is the largest number of bytes allocated above what was live before the forward:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocator's running total as recorded by
``torch.profiler`` (profile_memory=True), i.e. every allocation and free the CPU allocator saw,
including autograd's saved tensors. Time is measured in separate runs without the profiler.
The ratio mem(L_max) / mem(L_min) is ~L_max/L_min for linear memory and its square for quadratic.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

if __name__ == "__main__":
    # Run as a script, sys.path[0] is benchmarks/, whose kernels.py would shadow the project's
    # ``kernels`` package: import from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from benchmarks._measure import median_seconds, peak_bytes  # noqa: E402
from pretrain.models.common.attention import (  # noqa: E402
    CausalSelfAttention,
    SparseGlobalAttention,
)
from pretrain.models.config import AttentionConfig  # noqa: E402

VARIANTS = ("sga", "sga_packed", "full", "full_packed")
N_DOCS_PACKED = 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--summary-chunk", type=int, default=64)
    p.add_argument("--n-global", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", default="attention_memory.json")
    return p.parse_args()


def build_step(variant: str, args: argparse.Namespace, length: int) -> Callable[[], None]:
    """One forward + backward of the chosen module on a fresh [1, L, D] input."""
    cfg = AttentionConfig(
        n_heads=args.heads,
        window=args.window,
        summary_chunk=args.summary_chunk,
        n_global=args.n_global,
    )
    cls = SparseGlobalAttention if variant.startswith("sga") else CausalSelfAttention
    torch.manual_seed(0)
    module = cls(args.d_model, cfg).to(args.device)
    x = torch.randn(1, length, args.d_model, device=args.device, requires_grad=True)
    seq_idx = None
    if variant.endswith("packed"):
        seq_idx = (torch.arange(length, device=args.device) * N_DOCS_PACKED // length)[None]

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            out = module(x, seq_idx)
        out.float().square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def print_table(rows: list[dict], ratios: dict[str, float], lengths: list[int]) -> None:
    print(f"\n{'variant':<12} {'L':>6} {'peak MiB':>10} {'ms/step':>10}")
    for r in rows:
        print(
            f"{r['variant']:<12} {r['length']:>6} {r['peak_mib']:>10.1f} {r['ms_per_step']:>10.1f}"
        )
    lo, hi = min(lengths), max(lengths)
    print(f"\nmem({hi}) / mem({lo}):  linear ~{hi / lo:.0f}, quadratic ~{(hi / lo) ** 2:.0f}")
    for variant, ratio in ratios.items():
        print(f"  {variant:<12} {ratio:6.2f}")
    by = {(r["variant"], r["length"]): r for r in rows}
    if ("sga", hi) in by and ("full", hi) in by:
        sga, full = by[("sga", hi)], by[("full", hi)]
        print(
            f"\nat L={hi}: sga/full memory {sga['peak_mib'] / full['peak_mib']:.2f},"
            f" time {sga['ms_per_step'] / full['ms_per_step']:.2f}"
        )


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    rows = []
    jobs = [(v, L) for v in args.variants for L in args.lengths]
    for variant, length in tqdm(jobs, desc="attention benchmark"):
        step = build_step(variant, args, length)
        step()  # first call outside the measurement: lazy init, allocator warm-up
        peak = peak_bytes(step, args.device)
        secs = median_seconds(step, args.device, args.repeats, warmup=1)
        rows.append(
            {
                "variant": variant,
                "length": length,
                "peak_mib": peak / 2**20,
                "ms_per_step": secs * 1e3,
            }
        )
    lo, hi = min(args.lengths), max(args.lengths)
    by = {(r["variant"], r["length"]): r for r in rows}
    ratios = {v: by[(v, hi)]["peak_mib"] / by[(v, lo)]["peak_mib"] for v in args.variants}
    print_table(rows, ratios, args.lengths)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    report = {
        "device": args.device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
        "mem_ratio_max_over_min_length": ratios,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
