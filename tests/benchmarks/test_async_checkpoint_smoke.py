"""benchmarks/async_checkpoint.py end to end with ``--quick`` (a ~2M-parameter state): every
mode and round measured in turns, real checkpoints written and removed, table, JSON and PNG.
Structure only: no timing is checked beyond being measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]
bench = load_benchmark("async_checkpoint.py")


def test_scaled_shape_divides_wide_dims_only() -> None:
    assert bench.scaled_shape((32768, 2048), 4) == (8192, 512)
    assert bench.scaled_shape((8, 2048, 896), 4) == (8, 512, 224)  # 8 experts kept
    assert bench.scaled_shape((4352, 1, 4), 32) == (136, 1, 4)  # conv width kept
    assert bench.scaled_shape((17,), 4) == (5,)  # rounded up


def test_quick_run_measures_every_mode_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, ckpt_dir = tmp_path / "async.json", tmp_path / "ckpt"
    report = bench.main(["--quick", "--out", str(out), "--dir", str(ckpt_dir)])

    assert json.loads(out.read_text())["summary"] == report["summary"]
    assert out.with_suffix(".png").stat().st_size > 0
    assert list(ckpt_dir.iterdir()) == []  # every checkpoint removed
    assert "async_over_sync_blocked" in capsys.readouterr().out

    s = report["settings"]
    state = report["state"]
    assert state["tensors"] == 440  # every parameter and buffer of hydra-1.6b
    assert state["full_parameters"] > 1.5e9 > 500 * state["parameters"]  # matrices / 32^2
    assert state["moment_bytes"] == 2 * state["parameter_bytes"]  # AdamW's two moments
    assert state["checkpoint_bytes"] > state["state_bytes"]  # + the step counts and metadata

    records = report["records"]
    # modes in turns, the order rotated each round
    assert [r["mode"] for r in records[:3]] == ["none", "sync", "async"]
    for rnd in range(s["repeats"]):
        assert sorted(r["mode"] for r in records if r["round"] == rnd) == ["async", "none", "sync"]
    for r in records:
        assert len(r["step_times_s"]) == (s["saves"] + 1) * s["every"]
        if r["mode"] == "none":
            assert r["save_times_s"] == r["wait_times_s"] == [] and r["checkpoint_bytes"] == 0
        else:
            assert len(r["save_times_s"]) == s["saves"] and len(r["wait_times_s"]) == s["saves"] + 1
            # one checkpoint kept (keep_last=1) of the same state: equal up to the manifest's time
            assert r["checkpoint_bytes"] == pytest.approx(state["checkpoint_bytes"], abs=64)
    summary = report["summary"]
    for name in ("async_over_sync_save", "async_over_sync_blocked"):
        ratio = summary["ratios"][name]
        assert len(ratio["per_round"]) == s["repeats"]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
