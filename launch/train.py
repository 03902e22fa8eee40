"""Training: ``train_main``, behind ``hydra-pretrain train`` under every launcher.

    hydra-pretrain train --config configs/hydra-tiny.yaml                 # one process
    torchrun --nproc_per_node 2 $(which hydra-pretrain) train --config ... parallel.backend=fsdp2
    python -m launch.deepspeed_run --num_gpus 2 $(which hydra-pretrain) train --config ... parallel.backend=deepspeed

``python -m launch.train ARGS`` (and ``deepspeed launch/train.py ARGS``) is an alias of
``hydra-pretrain train ARGS``: the same parser (``launch.cli.add_train_arguments``). Rank, world
size and local rank come from the standard environment variables. Training into an existing run
directory continues from its latest valid checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.config_errors import ConfigError


def make_tracker(cfg, info, run_dir: Path, run_id: str | None):
    """MLflow tracker of a run (rank 0 only; a no-op tracker elsewhere or when disabled)."""
    from launch.tracking import build_tracker

    tc = cfg.tracking
    return build_tracker(
        enabled=tc.enabled,
        run_dir=run_dir,
        experiment=tc.experiment,
        run_name=cfg.run.name or run_dir.name,
        run_id=run_id,
        tracking_uri=tc.uri,
        is_main_process=info.is_main,
        system_metrics=tc.system_metrics,
    )


def train_main(config: str, overrides: list[str], log_all_ranks: bool = False) -> int:
    """Load the config, train, return the exit code (2 for a config error).

    The stop handler comes first, before torch is even imported, and stays until the process
    exits: SIGTERM at any moment then ends in a saved step or a clean exit before the first one.
    ``log_all_ranks``: every rank logs (``launch.logging_setup``), not rank 0 alone.
    """
    from pretrain.stop_signal import process_stop_signal

    stop = process_stop_signal().install()  # already installed when started from a command line
    from launch.logging_setup import configure_logging
    from pretrain.build import run_training
    from pretrain.config import load_config

    configure_logging(all_ranks=log_all_ranks)
    try:
        cfg = load_config(config, overrides)
        run_training(cfg, tracker_factory=make_tracker, stop=stop)
    except ConfigError as err:  # a bad key or value, or a layout the world size cannot take
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``hydra-pretrain train ARGV`` (default: this command line's arguments)."""
    from launch.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from pretrain.stop_signal import process_stop_signal

    process_stop_signal().install()  # first, before torch is imported (parallel.dist)
    from pretrain.allocator import apply_malloc_policy

    apply_malloc_policy()  # before any large allocation (docs/performance.md)
    from parallel.dist import run_and_exit

    run_and_exit(main)
