"""Smoke test of ``benchmarks/kernels.py`` on CPU at the tiny config, plus its cost counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kernels.attention.ref import build_chunk_summaries, summary_visibility_dense
from kernels.backends import backend_problem, import_problem
from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("kernels.py")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_main_quick_cpu_writes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    report = bench.main(["--device", "cpu", "--quick", "--shapes", "tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert {"device", "device_name", "torch", "roofline", "shapes", "results"} <= data.keys()
    assert data["roofline"]["matmul_tflops"] > 0 and data["roofline"]["copy_gbps"] > 0
    assert data["shapes"]["tiny"]["ssd"] == {
        "b": 1,
        "T": 64,
        "H": 8,
        "P": 16,
        "N": 16,
        "G": 1,
        "L": 32,
    }
    cases = {(r["op"], r["mode"], r["backend"]) for r in data["results"]}
    expected = {
        (op, mode, backend)
        for op in bench.OPS
        for mode in bench.MODES
        for backend in bench.BACKENDS[op]
    }
    assert cases == expected and len(data["results"]) == len(expected)
    for row in data["results"]:
        status, reason = _expected_on_cpu(row["op"], row["backend"], row["mode"])
        assert row["status"] == status, row  # never "error": a broken backend fails here
        if status == "ok":
            for key in ("ms", "flops", "bytes", "tflops", "gbps", "floor_ms", "pct_floor"):
                assert row[key] > 0, (key, row)
            assert row["bound"] in ("compute", "memory")
            if row["backend"] != "torch":
                assert row["rel_err"] < 1e-4, row
        else:
            assert reason in row["reason"], row


def _expected_on_cpu(op: str, backend: str, mode: str) -> tuple[str, str]:
    """Status, and a part of the skip reason, of one case of a CPU run without ``--interpret``.

    Availability comes from ``kernels.backends`` (what the trainer would accept), except for
    FlexAttention, whose eager forward the benchmark runs on CPU although training cannot.
    """
    if backend == "torch":
        return "ok", ""
    if backend.startswith("triton"):
        installed = importlib.util.find_spec("triton") is not None
        return "skipped", "--interpret" if installed else "not installed"
    if (op, backend) == ("attention", "flex"):
        flex = import_problem("torch.nn.attention.flex_attention", "flex_attention")
        if flex is not None:
            return "skipped", "cannot be imported"
        return ("ok", "") if mode == "fwd" else ("skipped", "no backward on CPU")
    problem = backend_problem(op, backend, "cpu")
    return ("ok", "") if problem is None else ("skipped", problem)


def test_interpreted_triton_pkm_matches_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no importorskip: importing triton before TRITON_INTERPRET is set breaks its interpreter
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored after the test; main sets it too
    # a config file of its own: a 36-row memory keeps the interpreted kernels to a few programs
    config = tmp_path / "micro.yaml"
    config.write_text("model: {d_model: 24, pkm: {n_subkeys: 6, top_k: 3, n_heads: 2, d_key: 8}}\n")
    argv = ["--device", "cpu", "--quick", "--shapes", str(config), "--ops", "pkm", "--interpret"]
    report = bench.main(argv + ["--seq-len", "20", "--out", str(tmp_path / "pkm.json")])
    assert report["shapes"]["micro"]["pkm"] == {"n": 20, "k": 6, "R": 36, "Dv": 24}
    rows = {(r["mode"], r["backend"]): r for r in report["results"]}
    for mode in bench.MODES:
        for backend in ("triton", "triton_det"):
            row = rows[(mode, backend)]
            assert row["status"] == "ok", row
            assert row["rel_err"] < 1e-5, row


def test_attention_pairs_match_the_reference_mask() -> None:
    dims = bench.AttnDims(b=1, T=200, H=1, Hkv=1, K=4, window=24, n_global=3, chunk=8)
    k = torch.zeros(1, dims.T, 1, dims.K)
    summaries = build_chunk_summaries(k, k, dims.chunk)
    doc = torch.zeros(1, dims.T, dtype=torch.long)
    visible = summary_visibility_dense(summaries, doc, dims.window, dims.n_global).sum()
    t = torch.arange(dims.T)
    local = ((t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - dims.window)).sum()
    assert bench.attention_pairs(dims) == int(visible + local)


def test_cost_counts_scale_as_expected() -> None:
    moe = bench.MoEDims(n=10, k=2, E=4, D=8, F=16, C=5)
    assert bench.moe_flops(moe, "fwd") == 6 * 10 * 2 * 8 * 16
    assert bench.moe_flops(moe, "fwd+bwd") == 3 * bench.moe_flops(moe, "fwd")
    pkm = bench.PKMDims(n=10, k=4, R=100, Dv=8)
    assert bench.pkm_flops(pkm, "fwd") == 2 * 10 * 4 * 8
    assert bench.pkm_bytes(pkm, "fwd+bwd", 4, 30) > bench.pkm_bytes(pkm, "fwd", 4, 30)
    ssd = bench.SSDDims(b=1, T=128, H=2, P=4, N=8, G=1, L=32)
    double_t = bench.SSDDims(b=1, T=256, H=2, P=4, N=8, G=1, L=32)
    assert bench.ssd_flops(double_t, "fwd") == 2 * bench.ssd_flops(ssd, "fwd")
