"""``train.compile=true`` trains with Inductor-compiled blocks to the eager run's losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pretrain.trainer_helpers import logged_rows, run_training


def test_compiled_run_with_checkpointing_gives_the_eager_losses(tmp_path: Path) -> None:
    """Six steps of the tiny Hydra (every component on): eager, and compiled with activation
    checkpointing, what a GPU run turns on. Under compile, ``kernels.moe=auto`` takes
    ``grouped_mm`` (no host sync), so the eager run is given that backend too; checkpointing
    changes no numbers. Inductor fuses and reorders fp32 arithmetic, so the losses agree to a
    relative 1e-4, not bitwise; the gradient norms (which amplify any difference) to 1e-3."""
    run_training(tmp_path / "eager", "kernels.moe=grouped_mm")
    run_training(tmp_path / "compiled", "train.compile=true", "train.activation_checkpointing=true")
    eager = [row for row in logged_rows(tmp_path / "eager") if "loss" in row]
    compiled = [row for row in logged_rows(tmp_path / "compiled") if "loss" in row]
    assert len(eager) == len(compiled) == 6
    for e, c in zip(eager, compiled):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4), (e["step"], e["loss"], c["loss"])
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3), e["step"]
