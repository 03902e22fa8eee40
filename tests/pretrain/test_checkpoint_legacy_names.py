"""A checkpoint written before the MoE experts became their own module (``...moe.w1`` instead of
``...moe.experts.w1``, in the model and in the optimizer state) still resumes, exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pretrain.checkpoint.files import MANIFEST, file_record
from tests.pretrain.trainer_helpers import losses, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def _rewrite_with_legacy_names(ckpt: Path, tmp: Path) -> int:
    """Re-save the DCP tensors of ``ckpt`` under the old parameter names; returns how many."""
    flat_file = tmp / "flat.pt"
    dcp_to_torch_save(ckpt, flat_file)
    state = torch.load(flat_file, weights_only=False)  # {"model": {"model": ..., "optim": ...}}
    renamed = 0
    for part in ("model", "optim"):
        current = state["model"][part]
        old = {
            re.sub(r"\.moe\.experts\.(w[123])(?=$|\.)", r".moe.\1", k): v
            for k, v in current.items()
        }
        renamed += sum(a != b for a, b in zip(current, old, strict=True))
        state["model"][part] = old
    for path in list(ckpt.iterdir()):
        if path.name == ".metadata" or path.suffix == ".distcp":
            path.unlink()
    dcp.save(state, checkpoint_id=ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {
        p.name: file_record(p) for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    return renamed


def test_checkpoint_with_old_expert_names_resumes_exactly(
    tmp_path: Path, hydra_fast_one_process: Path
) -> None:
    """The uninterrupted run is the session's one-process FAST run (tests/conftest.py)."""
    run_training(tmp_path / "old", stop_at=2)
    (ckpt,) = (tmp_path / "old" / "checkpoints").glob("step_*")
    # the expert weights and their Adam moments (exp_avg, exp_avg_sq, step) and LR entries
    assert _rewrite_with_legacy_names(ckpt, tmp_path) >= 3
    run_training(tmp_path / "old")
    assert len(losses(hydra_fast_one_process)) == 6
    assert losses(tmp_path / "old") == losses(hydra_fast_one_process)
