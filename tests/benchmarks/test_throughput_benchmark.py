"""Smoke test of ``benchmarks/throughput.py`` on CPU: the 29m configs shrunk by ``--quick``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.benchmark_scripts import load_benchmark

_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("throughput.py")


def test_quick_run_writes_every_record_ratio_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    report = bench.main(["--quick", "--device", "cpu", "--lengths", "64", "128", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert {"machine", "settings", "models", "results", "ratios"} <= data.keys()
    assert data["complete"] is True
    assert {"platform", "torch", "device", "device_name", "threads"} <= data["machine"].keys()
    matmul = data["matmul"]
    assert matmul["gflops"] > 0 and matmul["dtype"] == "float32"
    assert matmul["shape"] == [bench.MATMUL_QUICK["cpu"][0]] * 3
    assert matmul["threads"] == data["machine"]["threads"]
    names = ["hydra-29m", "transformer-29m", "mamba2-29m", "attamba-29m", "dreamer-29m"]
    assert list(data["models"]) == names
    assert data["settings"]["baseline"] == "transformer-29m"
    assert data["settings"]["precision"] == "fp32"
    cells = [(r["config"], r["length"], r["mode"]) for r in data["results"]]
    expected = {(n, length, mode) for n in names for length in (64, 128) for mode in bench.MODES}
    assert sorted(cells) == sorted(expected)
    assert "seq_idx" in data["settings"]["inputs"]
    assert all(m["data_sources"] == ["chaining"] for m in data["models"].values())
    for row in data["results"]:
        assert row["status"] == "ok", row
        assert row["batch"] == 256 // row["length"]
        assert row["documents_per_row"] >= 1, row
        if row["length"] == 128:  # the chaining task packs several problems into such a row
            assert row["documents_per_row"] > 1, row
        for key in ("tokens_per_s", "ms_per_step", "flops_per_token"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["peak_mib"] > 0, row
        assert row["gflops"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e9)
        assert row["of_matmul"] == pytest.approx(row["gflops"] / matmul["gflops"])
        # CPU: the process's resource usage per step (getrusage deltas)
        assert row["user_s_per_step"] >= 0 and row["system_s_per_step"] >= 0, row
        assert isinstance(row["minor_faults_per_step"], int) and row["minor_faults_per_step"] >= 0
    ratios = {(r["config"], r["length"], r["mode"]): r for r in data["ratios"]}
    assert set(ratios) == {c for c in expected if c[0] != "transformer-29m"}
    for r in ratios.values():
        for key in ("measured", "predicted", "measured_over_predicted"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    # every Hydra component is in the tiny model and counted
    hydra_flops = data["models"]["hydra-29m"]["forward_flops_by_component"]["64"]
    assert {"ssm", "attention", "moe", "ffn", "workspace", "pkm"} <= hydra_flops.keys()
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")


def test_steps_take_the_trainers_packed_batches_with_seq_idx() -> None:
    """Each step calls the model as the trainer does: the reader's input_ids and seq_idx of
    packed documents (more than one per row), a fresh batch per step."""
    path = str(_CONFIGS / "transformer-29m.yaml")
    subject = bench.build_subject(path, list(bench.QUICK_OVERRIDES), [128], torch.device("cpu"), 0)
    batches = bench.read_batches(subject.cfg, 2, 128, 3, torch.device("cpu"))
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].shape == b["seq_idx"].shape == b["labels"].shape == (2, 128)
        assert ((b["seq_idx"].diff(dim=1) != 0).sum(dim=1) >= 1).all()  # > 1 document per row
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    assert bench.documents_per_row(batches) > 1

    seen = []

    def record(module, args, kwargs):  # noqa: ANN001, ANN202
        seen.append((args[0], kwargs.get("seq_idx")))

    handle = subject.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for mode in bench.MODES:
            step = bench.make_step(subject.model, mode, batches, torch.device("cpu"))
            for _ in range(4):
                step()
    finally:
        handle.remove()
    assert len(seen) == 8
    for i, (ids, seq_idx) in enumerate(seen):
        b = batches[i % 4 % 3]
        assert ids is b["input_ids"] and seq_idx is b["seq_idx"]


def test_failing_cell_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_step = bench.make_step

    def failing_fwd_bwd(model, mode, batches, device):  # noqa: ANN001, ANN202
        if model.cfg.family == "hydra" and mode == "fwd+bwd":
            raise RuntimeError("simulated out of memory")
        return make_step(model, mode, batches, device)

    monkeypatch.setattr(bench, "make_step", failing_fwd_bwd)
    configs = [str(_CONFIGS / "transformer-29m.yaml"), str(_CONFIGS / "hydra-29m.yaml")]
    out, plot = tmp_path / "t.json", tmp_path / "plots" / "t.png"
    argv = ["--quick", "--configs", *configs, "--lengths", "64", "--out", str(out)]
    report = bench.main(argv + ["--plot", str(plot)])
    rows = {(r["config"], r["mode"]): r for r in report["results"]}
    failed = rows[("hydra-29m", "fwd+bwd")]
    assert failed["status"] == "error" and "simulated out of memory" in failed["error"]
    assert failed["flops_per_token"] > 0
    assert "gflops" not in failed and "system_s_per_step" not in failed
    assert all(r["status"] == "ok" for key, r in rows.items() if key != ("hydra-29m", "fwd+bwd"))
    ratios = {r["mode"]: r for r in report["ratios"]}
    assert ratios["fwd+bwd"]["measured"] is None and ratios["fwd+bwd"]["predicted"] > 0
    assert ratios["fwd"]["measured"] > 0
    assert plot.stat().st_size > 0
