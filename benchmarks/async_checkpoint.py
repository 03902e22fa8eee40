"""Training time blocked by an async DCP checkpoint against a sync one of the same state, on CPU.

Run:  python benchmarks/async_checkpoint.py --out docs/results/async_checkpoint.json
      (PNG next to it; about 3 minutes on 2 CPU cores at the default --scale 4)

The state: every parameter and persistent buffer of ``configs/hydra-1.6b.yaml`` (built on the meta
device, so the names and the number of tensors are the real model's), each dimension above 16
divided by ``--scale`` (d_model, d_ff, vocabulary, heads x head_dim ...; expert counts, conv width
and scalars kept), plus the trainer's AdamW (``pretrain.optim.build_optimizer``: its parameter
groups, ``exp_avg`` and ``exp_avg_sq`` for every parameter). ``--scale 4`` gives ~100M parameters,
~1.2 GB of parameters and moments; the real 1.6B state is 16x that.

A simulated training step is a fixed amount of compute (``--matmuls`` products of two
``--matmul-dim`` square fp32 matrices) and then ``optimizer.step()`` on fixed gradients (the
parameters and both moments change in place, as in training). Three modes, saved through the
real ``CheckpointManager`` (temporary directory, extra state, sha256 of every file, manifest,
rename, ``latest``; keep_last=1) into ``--dir``:

  none   no checkpoint;
  sync   ``save()`` writes and publishes the checkpoint before it returns;
  async  ``save()`` copies the state to CPU memory and returns; a background thread writes it;
         ``wait()`` (called by the next ``save``, or at the end) finishes it: the rest of the
         write, then the hashing, manifest and rename, on the training thread.

One segment of a mode: ``--saves`` times (``--every`` steps, ``wait()``, ``save()``), then
``--every`` more steps and a final ``wait()``. The modes take turns within each of ``--repeats``
rounds (the order rotates each round), so a machine that drifts affects all alike. Per segment:
the mean step time (compute + optimizer), ``save()``'s wall time, ``wait()``'s wall time (both
per checkpoint), their sum = blocked, and the segment's extra wall time over the ``none`` segment
of the same round per checkpoint (everything a checkpoint costs, including steps slowed by a
writer thread competing for the cores and the GIL). Reported: the median over rounds with
[min, max], the ratios async / sync of ``save()`` and of blocked time, and the wall time async
saves per checkpoint (sync's extra wall minus async's). Before the rounds, untimed: ``--warmup``
steps and one save of each kind. The checkpoints are deleted after each segment, and the
directory made under ``--dir`` (default: the system's temporary directory) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    _here = Path(__file__).resolve().parent  # benchmarks/kernels.py would shadow ``kernels``
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from benchmarks._figures import save_figure  # noqa: E402
from pretrain.checkpoint import CheckpointManager, ModelOptimizerState  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.models.config import ModelConfig  # noqa: E402
from pretrain.models.lm import build_model  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402

MODES = ("none", "sync", "async")
KEPT_DIM = 16  # dimensions up to this (expert counts, conv width, scalars) are not scaled
METRICS = ("step_s", "save_s", "wait_s", "blocked_s", "total_s", "overhead_per_save_s")


@dataclass(frozen=True)
class Settings:
    config: str
    scale: int
    every: int  # steps between checkpoints
    saves: int  # checkpoints per segment
    repeats: int  # rounds of (none, sync, async)
    warmup: int  # untimed steps first
    matmuls: int
    matmul_dim: int
    seed: int


# ------------------------------------------------------------------------------ the state


def scaled_shape(shape: tuple[int, ...], scale: int) -> tuple[int, ...]:
    """``shape`` with every dimension above ``KEPT_DIM`` divided by ``scale`` (rounded up)."""
    return tuple(d if d <= KEPT_DIM else math.ceil(d / scale) for d in shape)


def model_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(parameter shapes, persistent buffer shapes) of the model of ``cfg``, by name."""
    model = build_model(cfg, device="meta")
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    buffers = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in params}
    return params, buffers


class ShapedState(nn.Module):
    """Parameters and buffers under the given dotted names (a module per prefix), random values.

    Only a checkpoint's view of a model: it has no forward.
    """

    def __init__(
        self,
        params: dict[str, tuple[int, ...]],
        buffers: dict[str, tuple[int, ...]],
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        for name, shape in params.items():
            owner, leaf = self._owner(name)
            owner.register_parameter(leaf, nn.Parameter(torch.randn(shape, generator=generator)))
        for name, shape in buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, torch.zeros(shape))

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        module: nn.Module = self
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module, leaf


@dataclass
class TrainingState:
    model: ShapedState
    optimizer: torch.optim.Optimizer
    a: torch.Tensor  # the fixed compute's operands
    b: torch.Tensor
    matmuls: int

    def step(self) -> None:
        """One simulated training step: the fixed compute, then AdamW in place."""
        for _ in range(self.matmuls):
            torch.mm(self.a, self.b)
        self.optimizer.step()

    def app_state(self) -> dict[str, Any]:
        return {"model": ModelOptimizerState(self.model, self.optimizer)}


def build_state(s: Settings) -> tuple[TrainingState, dict[str, Any]]:
    """The scaled model with fixed gradients and its AdamW after one step (moments allocated),
    and a description of it (counts, bytes)."""
    cfg = load_config(REPO / s.config)
    params, buffers = model_shapes(cfg.model)
    gen = torch.Generator().manual_seed(s.seed)
    model = ShapedState(
        {n: scaled_shape(shape, s.scale) for n, shape in params.items()},
        {n: scaled_shape(shape, s.scale) for n, shape in buffers.items()},
        gen,
    )
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    tc = cfg.train
    optimizer = build_optimizer(
        model, tc.lr, tc.weight_decay, tuple(tc.betas), pkm_value_lr=tc.pkm_value_lr
    )
    a = torch.randn(s.matmul_dim, s.matmul_dim, generator=gen)
    state = TrainingState(model, optimizer, a, a.clone(), s.matmuls)
    state.optimizer.step()
    n_params = sum(p.numel() for p in model.parameters())
    moments = sum(
        st[k].numel() * st[k].element_size()
        for st in optimizer.state.values()
        for k in ("exp_avg", "exp_avg_sq")
    )
    info = {
        "full_parameters": sum(math.prod(shape) for shape in params.values()),
        "parameters": n_params,
        "tensors": len(params) + len(buffers),
        "parameter_bytes": n_params * 4,
        "moment_bytes": moments,
        "state_bytes": n_params * 4 + moments,
        "step_gflop": 2 * s.matmuls * s.matmul_dim**3 / 1e9,
    }
    return state, info


# ------------------------------------------------------------------------------ measurement


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_segment(
    state: TrainingState, mode: str, s: Settings, root: Path, on_step: Callable[[], None]
) -> dict[str, Any]:
    """One mode's segment (module docstring); its timings and the checkpoint's size on disk."""
    manager = (
        None if mode == "none" else CheckpointManager(root, keep_last=1, async_save=mode == "async")
    )
    steps, saves, waits = [], [], []
    step_no = 0

    def run_steps() -> None:
        nonlocal step_no
        for _ in range(s.every):
            steps.append(_timed(state.step))
            step_no += 1
            on_step()

    start = time.perf_counter()
    for _ in range(s.saves):
        run_steps()
        if manager is not None:
            waits.append(_timed(manager.wait))
            saves.append(
                _timed(lambda: manager.save(step_no, state.app_state(), {"step": step_no}))
            )
    run_steps()
    if manager is not None:
        waits.append(_timed(manager.wait))
    total = time.perf_counter() - start
    size = _dir_bytes(root) if root.exists() else 0
    shutil.rmtree(root, ignore_errors=True)
    save_s = sum(saves) / s.saves if saves else 0.0
    wait_s = sum(waits) / s.saves if waits else 0.0
    return {
        "mode": mode,
        "step_s": statistics.fmean(steps),
        "save_s": save_s,
        "wait_s": wait_s,
        "blocked_s": save_s + wait_s,
        "total_s": total,
        "step_times_s": steps,
        "save_times_s": saves,
        "wait_times_s": waits,
        "checkpoint_bytes": size,
    }


def warm_up(state: TrainingState, s: Settings, root: Path) -> None:
    """Untimed: ``s.warmup`` steps (first-touch page faults, allocator), then one sync and one
    async save (DCP's first-use set-up), so that no round pays them."""
    for _ in range(s.warmup):
        state.step()
    for async_save in (False, True):
        manager = CheckpointManager(root, keep_last=1, async_save=async_save)
        manager.save(0, state.app_state(), {"step": 0})
        manager.wait()
    shutil.rmtree(root, ignore_errors=True)


def measure(state: TrainingState, s: Settings, root: Path) -> list[dict[str, Any]]:
    """All rounds, modes in turns (rotated each round); one record per (round, mode)."""
    warm_up(state, s, root / "warmup")
    records = []
    bar = tqdm(total=s.repeats * len(MODES) * (s.saves + 1) * s.every, unit="step", disable=None)
    for rep in range(s.repeats):
        order = MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]
        by_mode = {}
        for mode in order:
            bar.set_description(f"round {rep + 1}/{s.repeats} {mode}")
            record = run_segment(state, mode, s, root / f"{mode}-{rep}", lambda: bar.update())
            by_mode[mode] = {"round": rep, **record}
        for mode in MODES:  # what a checkpoint costs in wall time, against no checkpoint
            extra = by_mode[mode]["total_s"] - by_mode["none"]["total_s"]
            by_mode[mode]["overhead_per_save_s"] = extra / s.saves
        records += [by_mode[mode] for mode in MODES]
    bar.close()
    return records


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode and metric: median and [min, max] over rounds; the async / sync ratios."""
    per_mode = {
        mode: {
            metric: _spread([r[metric] for r in records if r["mode"] == mode]) for metric in METRICS
        }
        for mode in MODES
    }
    rounds = sorted({r["round"] for r in records})
    pick = {(r["round"], r["mode"]): r for r in records}
    ratios = {}
    for metric in ("save_s", "blocked_s"):
        values = [pick[i, "async"][metric] / pick[i, "sync"][metric] for i in rounds]
        ratios[f"async_over_sync_{metric[:-2]}"] = {**_spread(values), "per_round": values}
    # the extra wall time of sync can be ~0 (or below, by noise) on a fast disk: a difference,
    # not a ratio
    gains = [
        pick[i, "sync"]["overhead_per_save_s"] - pick[i, "async"]["overhead_per_save_s"]
        for i in rounds
    ]
    return {
        "modes": per_mode,
        "ratios": ratios,
        "async_saves_wall_per_save_s": {**_spread(gains), "per_round": gains},
    }


# ------------------------------------------------------------------------------ output


def _ms(cell: dict[str, float]) -> str:
    return f"{1e3 * cell['median']:.0f} [{1e3 * cell['min']:.0f}, {1e3 * cell['max']:.0f}]"


def format_table(summary: dict[str, Any]) -> str:
    """Mode x metric, milliseconds, ``median [min, max]`` over rounds; then the comparisons."""
    labels = {
        "step_s": "step",
        "save_s": "save()",
        "wait_s": "wait()",
        "blocked_s": "blocked",
        "overhead_per_save_s": "extra wall",
    }
    lines = ["ms per step / per checkpoint, median [min, max] over rounds"]
    lines.append(f"{'mode':<7}" + "".join(f"{label:>24}" for label in labels.values()))
    for mode, metrics in summary["modes"].items():
        cells = ["-" if mode == "none" and k != "step_s" else _ms(metrics[k]) for k in labels]
        lines.append(f"{mode:<7}" + "".join(f"{c:>24}" for c in cells))
    for name, r in summary["ratios"].items():
        lines.append(f"{name}: {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    gain = _ms(summary["async_saves_wall_per_save_s"])
    lines.append(f"wall time async saves per checkpoint (extra wall sync - async): {gain} ms")
    return "\n".join(lines)


def plot(summary: dict[str, Any], info: dict[str, Any], path: Path) -> None:
    """Left: time blocked per checkpoint (save() + wait()); right: step time and extra wall
    time per checkpoint; bars are medians, error bars [min, max] over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = summary["modes"]

    def bar(ax: Any, x: float, cell: dict[str, float], bottom: float = 0.0, **kw: Any) -> None:
        err = [[cell["median"] - cell["min"]], [cell["max"] - cell["median"]]]
        ax.bar(x, cell["median"], bottom=bottom, yerr=err, capsize=4, **kw)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(("sync", "async")):
        save, wait = modes[mode]["save_s"], modes[mode]["wait_s"]
        bar(left, i, save, color="C0", width=0.6, label="save()" if i == 0 else None)
        bar(
            left, i, wait, save["median"], color="C1", width=0.6, label="wait()" if i == 0 else None
        )
    left.set_xticks([0, 1], ["sync", "async"])
    left.set_ylabel("seconds blocked per checkpoint")
    ratio = summary["ratios"]["async_over_sync_blocked"]["median"]
    left.set_title(f"blocked: async / sync = {ratio:.2f}", fontsize=10)
    left.legend(fontsize=8)
    for i, mode in enumerate(MODES):
        step = modes[mode]["step_s"]
        bar(right, i - 0.2, step, color="C2", width=0.4, label="step" if i == 0 else None)
    for i, mode in enumerate(("sync", "async"), start=1):
        cell = modes[mode]["overhead_per_save_s"]
        label = "extra wall per checkpoint" if i == 1 else None
        bar(right, i + 0.2, cell, color="C3", width=0.4, label=label)
    right.set_xticks(range(len(MODES)), MODES)
    right.set_ylabel("seconds")
    right.set_title("step time; wall time a checkpoint adds", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"hydra-1.6b shapes, dims > {KEPT_DIM} / {info['scale']}: {info['parameters'] / 1e6:.0f}M"
        " parameters,"
        f" {info['state_bytes'] / 2**30:.2f} GiB with AdamW moments",
        fontsize=10,
    )
    save_figure(fig, path)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/hydra-1.6b.yaml", help="relative to the repo")
    p.add_argument("--scale", type=int, default=4, help="divides every dimension above 16")
    p.add_argument("--every", type=int, default=4, help="steps between checkpoints")
    p.add_argument("--saves", type=int, default=2, help="checkpoints per segment")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (none, sync, async)")
    p.add_argument("--matmuls", type=int, default=8, help="matrix products per step")
    p.add_argument("--matmul-dim", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", default="docs/results/async_checkpoint.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--quick", action="store_true", help="scale 32, 2 rounds: seconds (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.scale, args.every, args.saves, args.repeats, args.warmup = 32, 2, 1, 2, 1
        args.matmuls, args.matmul_dim = 2, 128
    if min(args.scale, args.every, args.saves, args.repeats) < 1:
        p.error("--scale, --every, --saves and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    start = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine skews the figures: recorded
    state, info = build_state(s)
    print(
        f"state: {info['parameters']:,} parameters in {info['tensors']} tensors"
        f" (hydra-1.6b: {info['full_parameters']:,}), {info['state_bytes'] / 2**30:.2f} GiB"
        f" with AdamW moments; {info['step_gflop']:.3g} GFLOP of matmuls per step"
    )
    parent = Path(args.dir) if args.dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="async_checkpoint-", dir=parent))
    try:
        records = measure(state, s, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = summarise(records)
    print(format_table(summary))
    sizes = [r["checkpoint_bytes"] for r in records if r["mode"] != "none"]
    report = {
        "meta": {
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpu_cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {**asdict(s), "quick": args.quick},
        "state": {**info, "scale": s.scale, "checkpoint_bytes": max(sizes)},
        "records": records,
        "summary": summary,
        "wall_s": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot(summary, report["state"], png)
    print(f"wrote {out} and {png} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
