"""Smoke test of ``benchmarks/gpu_check.py`` on CPU: every section at tiny shapes, plus the
pieces that decide pass/fail (peak table, targets, a failing section, an unchecked kernel)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from kernels.backends import TRITON_MODULES
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("gpu_check.py")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, row)


def _check_correctness(a: dict) -> None:
    assert {c["op"] for c in a["cases"]} == set(TRITON_MODULES)
    names = [c["name"] for c in a["cases"]]
    assert any("long" in n for n in names) and any("bfloat16" in n for n in names)
    for case in a["cases"]:
        if not HAS_TRITON:
            assert case["status"] == "skipped" and case["reason"], case
            continue
        assert case["status"] == "ok", case  # interpreted on CPU
        assert case["pass"], case
        assert set(case["max_rel_err"]) == set(case["tolerance"])
        assert all(0 <= e <= case["tolerance"][n] for n, e in case["max_rel_err"].items())
    long = next(c for c in a["cases"] if "long" in c["name"])
    assert long["dims"]["offsets_past_int32"] is False  # the GPU run's case passes 2^31
    assert a["pass"] is (True if HAS_TRITON else None)


def _check_ssd_timing(b: dict) -> None:
    assert b["roofline"]["copy_gbps"] > 0
    (row,) = b["rows"]
    assert row["mamba_ssm"]["status"] == "skipped" and "CUDA" in row["mamba_ssm"]["reason"]
    assert row["mamba_ms_over_ours"] is None
    ours = row["triton"]
    if HAS_TRITON:
        assert ours["status"] == "ok", ours
        _positive(ours, "ms", "bytes", "bw_floor_ms", "pct_bw_floor", "floor_ms")
    else:
        assert ours["status"] == "skipped" and ours["reason"]


def _check_throughput(c: dict) -> None:
    names = ("hydra-29m", "transformer-29m", "mamba2-29m")
    assert sorted((r["config"], r["length"]) for r in c["results"]) == sorted(
        (n, length) for n in names for length in (64, 128)
    )
    for row in c["results"]:
        assert row["status"] == "ok" and row["mode"] == "fwd+bwd", row
        _positive(row, "tokens_per_s", "ms_per_step")
    assert c["baseline"] == "transformer-29m"
    assert {(r["config"], r["length"]) for r in c["ratios"]} == {
        (n, length) for n in names[::2] for length in (64, 128)
    }
    assert all(r["measured"] > 0 for r in c["ratios"])


def _check_train_step(d: dict) -> None:
    assert d["measured_path"] == "eager"
    assert d["paths"]["compiled"]["status"] == "skipped"
    _positive(d, "step_s", "first_step_s", "tokens_per_s", "train_flops_per_token", "model_tflops")
    assert d["tokens_per_step"] == d["batch"] * d["seq_len"] == 2 * 128
    assert d["model_tflops"] == pytest.approx(d["train_flops_per_token"] * d["tokens_per_s"] / 1e12)
    assert d["peak_bf16_tflops"] is None and d["mfu"] is None  # no peak for a CPU
    assert d["peak_above_start_gib"] > 0 and d["max_memory_allocated_gib"] is None
    assert d["params"] > 0 and d["kernel_backends"]["ssd"] == "torch"


def test_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results" / "gpu_check.json"
    report = bench.main(["--device", "cpu", "--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report, default=str))
    assert data["complete"] is True and data["smoke"] is True and data["notes"]
    assert data["machine"]["device"] == "cpu"
    assert list(data["sections"]) == list(bench.SECTIONS.values())
    for name, section in data["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        assert section["seconds"] > 0
    _check_correctness(data["sections"]["correctness"])
    _check_ssd_timing(data["sections"]["ssd_timing"])
    _check_throughput(data["sections"]["throughput"])
    _check_train_step(data["sections"]["train_step"])
    targets = {t["name"]: t for t in data["targets"]}
    assert "hydra / transformer tokens/s at L=128" in targets
    assert targets["hydra-29m MFU (eager path)"]["pass"] is None  # no peak: not evaluable
    assert all(t["pass"] in (True, False, None) for t in data["targets"])


def test_failing_section_is_recorded_and_the_next_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(plan, device):  # noqa: ANN001, ANN202
        raise RuntimeError("simulated CUDA error")

    monkeypatch.setattr(bench, "section_throughput", broken)
    monkeypatch.setitem(TRITON_MODULES, "made_up", ("kernels.made_up", "made_up_triton"))
    monkeypatch.setattr(bench, "CHECK_BUILDERS", {})  # no op has a check: no kernel runs
    out = tmp_path / "g.json"
    report = bench.main(["--device", "cpu", "--smoke", "--sections", "c,a", "--out", str(out)])
    assert list(report["sections"]) == ["throughput", "correctness"]
    c = report["sections"]["throughput"]
    assert c["status"] == "error" and "simulated CUDA error" in c["error"] and c["traceback"]
    a = report["sections"]["correctness"]
    assert a["status"] == "ok" and a["pass"] is False  # an unchecked Triton kernel fails
    assert {case["op"] for case in a["cases"]} == set(TRITON_MODULES)
    assert all(
        case["status"] == "error" and "no correctness check" in case["error"] for case in a["cases"]
    )
    assert json.loads(out.read_text())["complete"] is True


def test_dense_bf16_peak_by_device_name() -> None:
    peak = bench.dense_bf16_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA H200 NVL") is None and peak("NVIDIA H100 NVL") is None
    assert peak("NVIDIA A100-SXM4-80GB") is None and peak("cpu") is None


def test_targets_from_measured_figures() -> None:
    def ratio(length: int, measured: float) -> dict:
        return {"config": "hydra-29m", "length": length, "mode": "fwd+bwd", "measured": measured}

    sections = {
        "correctness": {"status": "ok", "pass": True},
        "ssd_timing": {
            "rows": [
                {"shape": "s", "mamba_ms_over_ours": 1.2, "triton": {"pct_bw_floor": 40.0}},
                {"shape": "t", "mamba_ms_over_ours": None, "triton": {"status": "error"}},
            ]
        },
        "throughput": {
            "status": "ok",
            "target_length": 8192,
            "ratios": [ratio(2048, 1.5), ratio(8192, 2.5), ratio(32768, 2.4)],
        },
        "train_step": {"status": "ok", "config": "x/hydra-1.6b.yaml", "measured_path": "compiled"}
        | {"mfu": 0.41},
    }
    got = {t["name"]: t["pass"] for t in bench.evaluate_targets(sections)}
    assert got == {
        "every Triton kernel within tolerance": True,
        "ssd s: mamba_ssm ms / ours": True,
        "ssd s: % of bandwidth floor": False,
        "ssd t: mamba_ssm ms / ours": None,
        "ssd t: % of bandwidth floor": None,
        "hydra / transformer tokens/s at L=8192": True,
        "hydra / transformer ratio grows with L": False,
        "hydra-1.6b MFU (compiled path)": True,
    }
