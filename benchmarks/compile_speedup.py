"""Training speed with ``train.compile=true`` against eager, through the trainer, on one device.

Run:  python benchmarks/compile_speedup.py --out docs/results/compile_cpu.json
      python benchmarks/compile_speedup.py --device cuda --config configs/hydra-29m.yaml

The same config trains ``--steps`` optimizer steps eagerly and compiled (Inductor, each block
compiled once: ``parallel.apply.apply_compile``), in turns (eager, compiled, eager, compiled ...,
``--repeats`` of each), so a machine that drifts affects both alike. Each run is the real
trainer in this process (``pretrain.build.build_trainer``) with every component on from the
first step (``curriculum.stages=[]``: a stage change would recompile), no tracking and no
checkpoints. Both modes use the same kernel backends (``kernels.moe=grouped_mm`` by default:
the ``torch`` expert loop needs host-side counts and breaks the graph once per MoE layer).

Per run: the median step time of the steps after the first ``--skip`` (the compiled run's first
steps include compilation, reported apart as ``first_steps_s``) and the losses. Reported: the
compiled/eager tokens/s ratio per repeat pair and its median and spread, and the largest
relative loss difference between the modes (compiled code reorders floating-point sums, so the
losses agree closely, not bitwise). Writes a table, and JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    _here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow ``kernels``
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))

from parallel.dist import DistInfo  # noqa: E402
from pretrain.build import build_trainer  # noqa: E402
from pretrain.config import load_config  # noqa: E402

MODES = ("eager", "compiled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "hydra-tiny.yaml"))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="runs of each mode, in turns")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    p.add_argument("--out", default=None, help="JSON path (default compile_<device>.json)")
    p.add_argument(
        "overrides",
        nargs="*",
        default=["kernels.moe=grouped_mm"],
        help="dotted config overrides applied to both modes (default: kernels.moe=grouped_mm)",
    )
    args = p.parse_args(argv)
    if args.skip >= args.steps:
        p.error(f"--skip ({args.skip}) must be below --steps ({args.steps})")
    return args


def train_once(args: argparse.Namespace, compiled: bool, run_dir: Path) -> dict[str, Any]:
    """One training run; its per-step times and losses from the trainer's own metrics."""
    overrides = [
        *args.overrides,
        f"train.steps={args.steps}",
        f"train.compile={str(compiled).lower()}",
        f"train.device={args.device}",
        "train.log_every=1",
        "curriculum.stages=[]",
        "tracking.enabled=false",
        "checkpoint.enabled=false",
        "run.plot=false",
        f"run.dir={run_dir}",
    ]
    cfg = load_config(args.config, overrides)
    torch._dynamo.reset()  # every compiled run pays its own compilation
    device = torch.device(args.device)
    trainer = build_trainer(cfg, DistInfo(device=device), log=lambda message: None)
    rows = [row for row in trainer.run() if "loss" in row]
    times = [row["step_time_s"] for row in rows]
    tokens = rows[-1]["tokens_per_s"] * times[-1]  # tokens of one step
    timed = times[args.skip :]
    return {
        "mode": "compiled" if compiled else "eager",
        "median_step_s": statistics.median(timed),
        "tokens_per_s": tokens / statistics.median(timed),
        "first_steps_s": sum(times[: args.skip]),
        "losses": [row["loss"] for row in rows],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of each (eager, compiled) pair of runs and the loss agreement."""
    pairs = list(zip(runs[0::2], runs[1::2]))
    ratios = [c["tokens_per_s"] / e["tokens_per_s"] for e, c in pairs]
    loss_diff = max(abs(a - b) / abs(a) for e, c in pairs for a, b in zip(e["losses"], c["losses"]))
    return {
        "compiled_over_eager": statistics.median(ratios),
        "ratio_per_pair": ratios,
        "ratio_spread": [min(ratios), max(ratios)],
        "max_relative_loss_difference": loss_diff,
        "first_steps_s": {m: [r["first_steps_s"] for r in runs if r["mode"] == m] for m in MODES},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for compiled in (False, True):
                run = train_once(args, compiled, Path(tmp) / f"{repeat}-{compiled}")
                runs.append(run)
                print(
                    f"repeat {repeat} {run['mode']:>8}: {run['tokens_per_s']:,.0f} tokens/s"
                    f" (median step {run['median_step_s'] * 1e3:.1f} ms; first {args.skip}"
                    f" steps {run['first_steps_s']:.1f} s), final loss {run['losses'][-1]:.4f}",
                    flush=True,
                )
    summary = summarise(runs)
    print(
        f"compiled / eager tokens/s: {summary['compiled_over_eager']:.2f}"
        f" (pairs {', '.join(f'{r:.2f}' for r in summary['ratio_per_pair'])});"
        f" largest relative loss difference {summary['max_relative_loss_difference']:.2e}"
    )
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "steps": args.steps,
        "skip": args.skip,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "runs": runs,
        "summary": summary,
    }
    out = Path(args.out or f"compile_{args.device}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
