"""benchmarks/compile_speedup.py end to end at a tiny size (Dynamo's eager backend stands in for
Inductor here, whose C++ compilation would take minutes; the benchmark itself uses Inductor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

import pretrain.models.parallelize as parallelize
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")

bench = load_benchmark("compile_speedup.py")


def test_runs_both_modes_in_turns_and_writes_the_ratio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled_models: list[nn.Module] = []

    def compile_traced_only(model: nn.Module) -> None:
        compiled_models.append(model)
        for block in model.blocks.values():
            block.compile(backend="eager")

    monkeypatch.setattr(parallelize, "apply_compile", compile_traced_only)
    out = tmp_path / "compile.json"
    result = bench.main(
        [
            "--steps",
            "4",
            "--skip",
            "1",
            "--repeats",
            "2",
            "--out",
            str(out),
            "kernels.moe=grouped_mm",
            "model.n_layers=2",
            "model.workspace.after_blocks=[1]",
            "model.pkm.after_blocks=[0]",
            "train.seq_len=64",
            "train.batch_size=2",
        ]  # fmt: skip
    )
    assert len(compiled_models) == 2  # one per compiled run, none for the eager ones
    assert [r["mode"] for r in result["runs"]] == ["eager", "compiled"] * 2
    for run in result["runs"]:
        assert len(run["losses"]) == 4 and run["tokens_per_s"] > 0
    summary = result["summary"]
    assert len(summary["ratio_per_pair"]) == 2
    assert (
        summary["ratio_spread"][0] <= summary["compiled_over_eager"] <= summary["ratio_spread"][1]
    )
    assert summary["max_relative_loss_difference"] < 1e-4  # traced, not recompiled: same math
    assert json.loads(out.read_text())["summary"] == summary
