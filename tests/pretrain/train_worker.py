"""Run a short training here or under torchrun, optionally stopping after a given step as a
SIGTERM would (checkpoint, clean exit). Used by the trainer tests:

    python tests/pretrain/train_worker.py CONFIG STOP_AT [overrides...]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.logging_setup import configure_logging  # noqa: E402
from launch.train import make_tracker  # noqa: E402
from parallel.dist import init_distributed, run_and_exit, shutdown  # noqa: E402
from pretrain.build import build_trainer  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def stop_after(trainer: Trainer, step: int) -> None:
    """Make the trainer see a stop request once ``step`` optimizer steps are done."""
    original = trainer.train_step

    def train_step(stage):
        metrics = original(stage)
        if trainer.state.step >= step:
            trainer.stop.requested = "TEST"
        return metrics

    trainer.train_step = train_step


def inject_fault(trainer: Trainer, spec: str) -> None:
    """``RANK:STEP:SIGNAL`` (e.g. ``1:5:KILL``): that rank sends itself SIGNAL once it has done
    optimizer step STEP, in the launcher's first attempt only (a restart then runs clean).
    ``HANG`` instead of a signal: the rank stops answering like a SIGSTOPped one, but dies at
    the launcher's SIGTERM (a stopped process waits out torchrun's 30 s shutdown grace)."""
    import signal
    import threading

    rank, step, name = spec.split(":")
    if trainer.info.rank != int(rank) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    original = trainer.train_step

    def train_step(stage):
        metrics = original(stage)
        if trainer.state.step == int(step) and name == "HANG":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            threading.Event().wait()
        elif trainer.state.step == int(step):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return metrics

    trainer.train_step = train_step


def dump_first_gradients(trainer: Trainer, path: Path) -> None:
    """The full (unsharded) gradient of every parameter at the first step, before clipping,
    written by rank 0 (``full_tensor`` gathers FSDP and expert shards)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    original = trainer.engine.clip_grad_norm

    def clip_grad_norm(max_norm: float) -> float:
        if trainer.state.step == 0:
            grads = {}
            for name, param in trainer.model.named_parameters():
                if param.grad is not None:
                    g = param.grad
                    g = g.full_tensor() if isinstance(g, DTensor) else g
                    grads[name] = g.detach().clone().contiguous()
            if trainer.info.is_main:
                save_file(grads, str(path))
        return original(max_norm)

    trainer.engine.clip_grad_norm = clip_grad_norm


def dump_full_params(trainer: Trainer, path: Path) -> None:
    """The full (unsharded) parameters, written by rank 0, to compare layouts."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = trainer.model
    if trainer.cfg.parallel.backend == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # ZeRO-3 partitions
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if trainer.info.is_main:
        params = {
            k: v.detach().clone().contiguous() for k, v in state.items() if "expert_bias" not in k
        }
        save_file(params, str(path))


def dump_table_shapes(trainer, path: Path) -> None:  # noqa: ANN001
    """The shape of the part of each PKM value table that rank 0 holds (a shard when split)."""
    from torch.distributed.tensor import DTensor

    def held(p):  # noqa: ANN001, ANN202 - ZeRO-3 keeps a flat partition; ds_shape is the whole
        return (
            p.ds_shape
            if hasattr(p, "ds_shape")
            else (p.to_local() if isinstance(p, DTensor) else p).shape
        )

    if trainer.info.is_main:
        shapes = {
            name: list(held(p))
            for name, p in trainer.model.named_parameters()
            if name.endswith("values.weight")
        }
        path.write_text(json.dumps(shapes))


def count_fsdp_gathers(path: Path, is_main: bool) -> None:
    """Count, per parameter name, how often FSDP2 all-gathers it; rank 0 writes the counts to
    ``path`` at exit (the Dreamer test checks its shared layer is gathered once per step)."""
    import atexit
    from collections import Counter

    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    counts: Counter[str] = Counter()
    original = param_group.foreach_all_gather

    def counting(fsdp_params, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts.update(p._param_fqn for p in fsdp_params)
        return original(fsdp_params, *args, **kwargs)

    param_group.foreach_all_gather = counting
    if is_main:
        atexit.register(lambda: path.write_text(json.dumps(counts)))


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a C++ shared-memory all-reduce for CPU ranks the first time a
    machine (or a new venv) starts it: about a minute on 2 cores, in every fresh CI run. These
    tests check our engine over gloo, so DeepSpeed is told the op is not available (it then
    all-reduces through torch.distributed, as on any machine without a compiler)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def bound_tracker_close(timeout_s: float) -> None:
    """Give the MLflow tracker's ``close()`` at most ``timeout_s`` (the default is 15 s): a run
    tracked to a store that never answers then ends that much sooner, still through the path that
    gives up and names what was never sent."""
    import functools

    import launch.tracking

    launch.tracking.build_tracker = functools.partial(
        launch.tracking.build_tracker, close_timeout_s=timeout_s
    )


def main(argv: list[str]) -> int:
    config, stop_at, *overrides = argv
    configure_logging()  # the trainer's lines on stdout, rank 0's, as launch.train shows them
    cfg = load_config(config, overrides)
    if cfg.parallel.backend == "deepspeed":
        skip_deepspeed_shm_build()
    if os.environ.get("HYDRA_TEST_CLOSE_TIMEOUT_S"):
        bound_tracker_close(float(os.environ["HYDRA_TEST_CLOSE_TIMEOUT_S"]))
    info = init_distributed(cfg.train.device, timeout_s=cfg.parallel.timeout_s)
    if os.environ.get("HYDRA_TEST_COUNT_GATHERS"):
        count_fsdp_gathers(Path(cfg.run.dir) / "gathers.json", info.is_main)
    try:
        trainer = build_trainer(cfg, info, tracker_factory=make_tracker)
        if int(stop_at) > 0:
            stop_after(trainer, int(stop_at))
        if os.environ.get("HYDRA_TEST_FAULT"):
            inject_fault(trainer, os.environ["HYDRA_TEST_FAULT"])
        if os.environ.get("HYDRA_TEST_DUMP_GRADS"):
            dump_first_gradients(trainer, Path(cfg.run.dir) / "first_grads.safetensors")
        trainer.run()
        if os.environ.get("HYDRA_TEST_DUMP_PARAMS"):
            dump_full_params(trainer, Path(cfg.run.dir) / "final_params.safetensors")
            dump_table_shapes(trainer, Path(cfg.run.dir) / "table_shapes.json")
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
