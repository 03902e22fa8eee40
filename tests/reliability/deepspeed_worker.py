"""``tests/pretrain/train_worker.py`` for the DeepSpeed checkpoint tests. Every rank prints the
checkpoint step it loaded (``rank R loaded step S``); two fault hooks:

- ``HYDRA_TEST_CRASH_PUBLISHING=N``: rank 0 dies (``os._exit``) while publishing checkpoint N,
  after its manifest is written and just before the rename: the most complete leftover a crash
  can leave;
- ``HYDRA_TEST_FORBID_UNSAFE_LOADS=1``: any ``torch.load(weights_only=False)`` in the process
  raises, so a resume proves that every checkpoint file was read with ``weights_only=True``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from parallel.deepspeed import DeepSpeedCheckpoints  # noqa: E402
from parallel.dist import run_and_exit  # noqa: E402
from pretrain.checkpoint import files  # noqa: E402
from pretrain.checkpoint.files import TMP_PREFIX  # noqa: E402
from tests.pretrain.train_worker import main  # noqa: E402


def crash_while_publishing(step: int) -> None:
    original = files.fsync_dir
    doomed = f"{TMP_PREFIX}{files.step_dir_name(step)}"

    def fsync_dir(path: Path) -> None:
        original(path)
        if path.name == doomed:  # the manifest is in, the rename comes next
            os._exit(3)

    files.fsync_dir = fsync_dir


def forbid_unsafe_loads() -> None:
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise RuntimeError(f"torch.load(weights_only=False) of {args[:1]}")
        return original(*args, **kwargs)

    torch.load = load


def report_loads() -> None:
    original = DeepSpeedCheckpoints.load_latest

    def load_latest(self: DeepSpeedCheckpoints) -> dict[str, Any] | None:
        extra = original(self)
        if extra is not None:
            print(
                f"rank {self.engine.info.rank} loaded step {extra['checkpoint_step']}", flush=True
            )
        return extra

    DeepSpeedCheckpoints.load_latest = load_latest


if __name__ == "__main__":
    report_loads()
    if os.environ.get("HYDRA_TEST_CRASH_PUBLISHING"):
        crash_while_publishing(int(os.environ["HYDRA_TEST_CRASH_PUBLISHING"]))
    if os.environ.get("HYDRA_TEST_FORBID_UNSAFE_LOADS"):
        forbid_unsafe_loads()
    run_and_exit(lambda: main(sys.argv[1:]))
