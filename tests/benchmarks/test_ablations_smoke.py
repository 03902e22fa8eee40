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
        "chaining_h1 accuracy",
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
    assert "chaining_h5 accuracy" in table and "n/a" in table
    assert "±" not in table  # one seed: no interval


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


def test_t_interval_matches_tables_and_needs_two_values() -> None:
    assert bench.t_quantile_975(1) == 12.706 and bench.t_quantile_975(4) == 2.776
    # past the table the expansion continues it smoothly down towards the normal 1.960
    assert 2.030 < bench.t_quantile_975(31) < bench.t_quantile_975(30)
    assert 1.960 < bench.t_quantile_975(1000) < 1.963
    with pytest.raises(ValueError):
        bench.t_quantile_975(0)
    assert bench.ci95_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(4.303 / math.sqrt(3))
    assert bench.ci95_halfwidth([0.5]) is None
    runs = [{"variant": "full", "scores": {"t": {"accuracy": a}}} for a in (0.2, 0.4)]
    runs.append({"variant": "transformer", "scores": {"t": {"accuracy": 0.3}}})
    summary = bench.summarize(runs)
    assert summary["t accuracy"]["full"]["ci95"] == pytest.approx(12.706 * 0.1)
    assert summary["t accuracy"]["transformer"]["ci95"] is None
    table = bench.format_table(summary, ["full", "transformer"])
    assert "0.300 ± 1.271" in table  # full: two seeds
    assert table.rstrip().endswith(" 0.300")  # transformer: one seed, no interval


def test_t_quantile_beyond_the_table_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (2, 9, 30, 31, 45, 100, 400):
        assert bench.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_two_jobs_give_the_results_of_one(tmp_path: Path) -> None:
    argv = ["--tasks", "chaining", "--variants", "full", "transformer", "--seeds", "1",
            "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--eval-batches", "1",
            "--warmup-steps", "1", "--labels", "answers", "--model", *TINY_MODEL,
            "--task-args", 'chaining={"hops": [1, 2, 2], "n_symbols": 16, "n_distractors": 1}']  # fmt: skip
    one = bench.main([*argv, "--out", str(tmp_path / "one.json")])
    two = bench.main([*argv, "--jobs", "2", "--out", str(tmp_path / "two.json")])
    assert [r["variant"] for r in one["runs"]] == ["full", "transformer"]
    assert not (tmp_path / "two.runs.jsonl").exists()  # removed once the report is written
    assert one["tasks"]["chaining"]["source"]["task_args"]["hops"] == [1, 2, 2]
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert (a["variant"], a["loss_last"], a["scores"]) == (
            b["variant"],
            b["loss_last"],
            b["scores"],
        )


def test_bad_task_args_and_empty_plans_are_errors() -> None:
    with pytest.raises(SystemExit, match="TASK=JSON"):
        bench.parse_task_args(["nosuchtask={}"])
    with pytest.raises(SystemExit, match="not JSON"):
        bench.parse_task_args(["chaining={hops"])
    assert bench.parse_task_args(['chaining={"hops": [1]}', 'chaining={"n_symbols": 8}']) == {
        "chaining": {"hops": [1], "n_symbols": 8}
    }
    assert bench.plan_runs(["chaining"], False, ["transformer"]) == [("chaining", "transformer")]


def test_finished_runs_are_logged_as_they_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "run_job", lambda job: {"loss_last": float(len(job["name"]))})
    progress = tmp_path / "sweep.runs.jsonl"
    results = bench.run_all([{"name": "a"}, {"name": "bb"}], 1, progress)
    assert results == [{"loss_last": 1.0}, {"loss_last": 2.0}]
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert lines == [{"name": "a", "loss_last": 1.0}, {"name": "bb", "loss_last": 2.0}]
