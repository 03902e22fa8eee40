"""Smoke test of ``benchmarks/profile_step.py`` on CPU: ``--quick`` (the tiny models, one length)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("profile_step.py")

_NAMES = ["hydra-29m", "transformer-29m", "mamba2-29m"]
_SSM = {"ssm_scan", "ssm_conv", "ssm_proj", "ssm_norm"}
# the components each family's tiny model runs (time), and those that count FLOPs
_RUNS = {
    "hydra": _SSM | {"attention", "moe_router", "moe_experts", "workspace", "pkm", "ffn"},
    "transformer": {"attention", "ffn"},
    "mamba2": _SSM,
}
_COMMON = {"residual", "norms_embedding", "head_loss"}
_NO_FLOPS = {"ssm_norm", "residual", "norms_embedding", "other"}  # elementwise: not counted


def test_quick_run_attributes_the_step_to_every_component(tmp_path: Path) -> None:
    out = tmp_path / "profile_step.json"
    report = bench.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["complete"] is True
    assert data["matmul"]["gflops"] > 0 and data["matmul"]["dtype"] == "float32"
    assert [(r["config"], r["length"]) for r in data["results"]] == [(n, 1024) for n in _NAMES]
    for row in data["results"]:
        assert row["status"] == "ok", row
        components = row["components"]
        assert list(components) == list(bench.COMPONENTS)
        assert math.isclose(sum(c["time_share"] for c in components.values()), 1, rel_tol=1e-6)
        assert math.isclose(sum(c["flop_share"] for c in components.values()), 1, rel_tol=1e-6)
        # every microsecond of the profiled step is somewhere, and little of it is "other"
        assert row["profiled_self_s"] == pytest.approx(row["profiled_wall_s"], rel=0.1)
        assert row["coverage"] > 0.9, (row["coverage"], row["other_top"])
        assert row["autograd_nodes"] > 0 and row["autograd_nodes_unmatched"] == 0
        runs = _RUNS[row["family"]] | _COMMON
        for key, c in components.items():
            assert c["time_s"] == pytest.approx(c["forward_s"] + c["backward_s"])
            if key in runs:  # forward and backward both found their way here
                assert c["forward_s"] > 0 and c["backward_s"] > 0, (row["config"], key, c)
            elif key != "other":
                assert c["time_s"] == 0 and c["flops"] == 0, (row["config"], key, c)
            if key in runs - _NO_FLOPS:
                assert c["flops"] > 0 and c["gflops"] > 0, (row["config"], key, c)
        assert components["other"]["flops"] == 0  # every FLOP-count key has a component
        step = row["step"]
        assert step["wall_s"] > 0 and step["user_s"] >= 0 and step["system_s"] >= 0
        assert step["minor_faults"] >= 0 and row["peak_rss_mib"] > 0
        assert row["gflops"] > 0 and row["profiler_overhead"] > 0
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes().startswith(b"\x89PNG")


def test_component_ranges_leave_the_model_as_it_was() -> None:
    """The forward wrappers are instance attributes of the profiled step only: after it the
    model has none, and its output is the same as without them."""
    path = str(Path(bench.REPO) / "configs" / "hydra-29m.yaml")
    overrides = list(bench.quick_overrides(path))
    subject = bench.build_subject(path, overrides, [64], torch.device("cpu"), 0)
    model = subject.model.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 64))
    with torch.no_grad():
        before = model(ids).logits
        with bench.ComponentRanges(model) as ranges:
            assert all("forward" in m.__dict__ for m in ranges.owner)
            during = model(ids).logits
        after = model(ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_flop_parts_map_onto_components() -> None:
    assert bench.flop_component("ssm.scan") == "ssm_scan"
    assert bench.flop_component("ssm.conv") == "ssm_conv"
    assert bench.flop_component("moe.router") == "moe_router"
    assert bench.flop_component("moe.experts") == "moe_experts"
    assert bench.flop_component("attention.scores") == "attention"
    assert bench.flop_component("pkm.lookup") == "pkm"
    assert bench.flop_component("ffn.proj") == "ffn"
    assert bench.flop_component("head") == "head_loss"
    assert bench.flop_component("unknown.part") == "other"
