"""Smoke test of ``benchmarks/ablations.py``: a few steps of tiny models, JSON, table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

TINY_MODEL = ["model.n_layers=2", "model.workspace.after_blocks=[1]", "model.pkm.after_blocks=[0]"]


pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("ablations.py")


def test_two_tasks_one_seed_write_json_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ablations.json"
    argv = ["--tasks", "domain_mixture", "chaining", "--seeds", "1", "--steps", "3",
            "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1", "--warmup-steps", "1",
            "--work-dir", str(tmp_path / "runs"), "--out", str(out), "--model", *TINY_MODEL]  # fmt: skip
    report = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"settings", "variants", "tasks", "runs", "summary", "wall_s"} <= report.keys()
    expected = {("domain_mixture", v) for v in ("full", "no_moe", "transformer", "attamba")}
    expected |= {("chaining", v) for v in ("full", "no_workspace", "transformer", "attamba")}
    assert {(r["task"], r["variant"]) for r in report["runs"]} == expected
    for run in report["runs"]:
        assert run["tokens"] == 3 * 2 * 64 and math.isfinite(run["loss_last"])
        for metrics in run["scores"].values():
            assert 0.0 <= metrics["accuracy"] <= 1.0
    assert set(report["runs"][0]["scores"]) == {"domain_mixture"}
    summary = report["summary"]
    assert set(summary) == {
        "domain_mixture accuracy",
        "domain_mixture expert_mi_bits",
        "chaining_h2 accuracy",
        "chaining_h3 accuracy",
        "chaining_h5 accuracy",
    }
    assert summary["domain_mixture expert_mi_bits"]["full"]["mean"] >= 0.0
    assert summary["domain_mixture expert_mi_bits"]["no_moe"]["mean"] is None  # no experts
    assert report["variants"]["no_moe"]["how"] == "config override model.moe.enabled=false"
    hydra = report["variants"]["full"]["params"]
    for baseline in ("transformer", "attamba"):
        assert abs(report["variants"][baseline]["params"] - hydra) / hydra < 0.1
    assert "model.family=attamba" in report["variants"]["attamba"]["how"]
    table = capsys.readouterr().out
    assert "chaining_h5 accuracy" in table and "n/a" in table and "±" in table


def test_plan_trains_the_relevant_variants_unless_asked_for_all() -> None:
    assert bench.plan_runs(["fact_lookup"], all_variants=False) == [
        ("fact_lookup", "full"),
        ("fact_lookup", "no_pkm"),
        ("fact_lookup", "transformer"),
        ("fact_lookup", "attamba"),
    ]
    assert len(bench.plan_runs(["fact_lookup", "chaining"], all_variants=True)) == 14


def test_scale_keeps_memories_at_their_relative_depth() -> None:
    overrides = dict(o.split("=", 1) for o in bench.scale_overrides(2))
    assert overrides["model.n_layers"] == "8" and overrides["model.d_model"] == "128"
    assert overrides["model.workspace.after_blocks"] == "[3]"
    assert overrides["model.pkm.after_blocks"] == "[5]"
    assert bench.scale_overrides(1) == []
