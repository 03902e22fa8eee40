"""Time of ``torch.exp`` by the range of its arguments, on this CPU.

Run:  python benchmarks/exp_ranges.py --out docs/results/exp_ranges_cpu.json

Why: on the CPU a vectorised exp whose result falls below fp32's smallest normal number (an
argument under about -87.3), or whose argument is -inf, can leave its fast path. Masked decays
(``exp(-inf)``) and strong decays (``exp(-200)``) are exactly what a chunked SSD scan computes, so
``kernels/ssd/chunked.py`` floors its log-decays at -80 and masks by multiplying; this benchmark
is the measurement behind that choice, rerun on any machine.

For each range, ``--elements`` uniform draws in it (or the constant), the median over
``--repeats`` timed calls of an in-place ``exp_`` on a copy (the copy is timed separately and
subtracted), in ns per element and as a multiple of the in-range case [-5, 0]. Table, JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RANGES: dict[str, tuple[float, float]] = {
    "[-5, 0]": (-5.0, 0.0),
    "[-80, -70]": (-80.0, -70.0),
    "[-87, -86]": (-87.0, -86.0),
    "[-95, -88] (denormal results)": (-95.0, -88.0),
    "[-103, -95] (denormal results)": (-103.0, -95.0),
    "[-200, -150] (results 0)": (-200.0, -150.0),
    "[-1e4, -1e3] (results 0)": (-1e4, -1e3),
    "-inf": (float("-inf"), float("-inf")),
}


def _median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(elements: int, repeats: int, dtype: torch.dtype) -> list[dict[str, float | str]]:
    """ns per element of ``exp_`` for each range in ``RANGES``."""
    out = torch.empty(elements, dtype=dtype)
    rows = []
    for name, (lo, hi) in RANGES.items():
        if lo == hi:
            src = torch.full((elements,), lo, dtype=dtype)
        else:
            src = torch.empty(elements, dtype=dtype).uniform_(lo, hi)
        both = _median_seconds(lambda src=src: out.copy_(src).exp_(), repeats)
        copy = _median_seconds(lambda src=src: out.copy_(src), repeats)
        rows.append({"range": name, "ns_per_element": max(both - copy, 0.0) / elements * 1e9})
    base = rows[0]["ns_per_element"]
    for row in rows:
        row["vs_in_range"] = row["ns_per_element"] / base if base > 0 else None  # too fast to see
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=1 << 18, help="elements per call")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--out", default="docs/results/exp_ranges_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.elements, args.repeats, getattr(torch, args.dtype))
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "settings": {"elements": args.elements, "repeats": args.repeats, "dtype": args.dtype},
        "results": rows,
    }
    print(f"exp_ on {args.elements} {args.dtype}, {args.threads} thread(s)")
    for r in rows:
        ratio = "-" if r["vs_in_range"] is None else f"{r['vs_in_range']:.1f}x"
        print(f"  {r['range']:<32} {r['ns_per_element']:8.2f} ns/element {ratio:>8}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
