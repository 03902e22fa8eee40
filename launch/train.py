"""Training entry point for every launcher.

    hydra-pretrain train --config configs/hydra-tiny.yaml                 # one process
    torchrun --nproc_per_node 2 -m launch.train --config ... parallel.backend=fsdp2
    deepspeed --num_gpus 2 launch/train.py --config ... parallel.backend=deepspeed

Rank, world size and local rank come from the standard environment variables. Training into an
existing run directory continues from its latest valid checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pretrain.config_errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.train", description="train a model")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    return parser


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


def train_main(config: str, overrides: list[str]) -> int:
    """Load the config, train, return the exit code (2 for a config error).

    The stop handler comes first, before torch is even imported, and stays until the process
    exits: SIGTERM at any moment then ends in a saved step or a clean exit before the first one.
    """
    from pretrain.stop_signal import StopSignal

    stop = StopSignal().install()
    from pretrain.build import run_training
    from pretrain.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, overrides)
        run_training(cfg, tracker_factory=make_tracker, stop=stop)
    except ConfigError as err:  # a bad key or value, or a layout the world size cannot take
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from launch.package_check import check_own_packages

    check_own_packages()
    args = build_parser().parse_args(argv)
    return train_main(args.config, args.overrides)


if __name__ == "__main__":
    from parallel.dist import run_and_exit

    run_and_exit(main)
