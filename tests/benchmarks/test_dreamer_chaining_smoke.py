"""Smoke test of ``benchmarks/dreamer_chaining.py``: the tiny model set, a few steps each through
the real trainer on the same tokens; accuracy curves, tokens to threshold, selection diversity,
JSON, tables and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("dreamer_chaining.py")


def test_tiny_models_on_equal_tokens_write_curves_diversity_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dreamer_chaining.json"
    argv = ["--model-scale", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "128",
            "--eval-every", "2", "--eval-batches", "1", "--diversity-batches", "1",
            "--threshold", "0.0", "--work-dir", str(tmp_path / "runs"), "--out", str(out)]  # fmt: skip
    report = bench.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    assert {"settings", "task", "chance", "models", "wall_s", "same_training_tokens"} <= set(report)
    assert report["same_training_tokens"]
    models = report["models"]
    assert list(models) == [m.name for m in bench.MODELS["tiny"]]
    digests = {m["train_tokens_sha256"] for m in models.values()}
    assert len(digests) == 1
    for m in models.values():
        assert m["tokens"] == 4 * 2 * 128 and m["steps"] == 4
        assert [p["step"] for p in m["curve"]] == [0, 2, 4]
        assert [p["tokens"] for p in m["curve"]] == [0, 2 * 256, 4 * 256]
        for p in m["curve"]:
            assert 0.0 <= p["accuracy"] <= 1.0 and p["answers"] > 0
            assert {"chaining_h2", "chaining_h3"} <= set(p)
        assert m["tokens_to_threshold"] == 0  # threshold 0: reached before training
        assert m["params"] > 0 and m["forward_flops_per_token_at_1024"] > 0
        assert math.isfinite(m["loss_last"])
    vocabs = {bench.load_config(bench.ROOT / s.config, list(s.overrides)).model.vocab_size
              for s in bench.MODELS["tiny"]}  # fmt: skip
    assert vocabs == {128}  # the same symbols for every model

    dreamer = models["dreamer-tiny"]["diversity"]["core"]
    assert dreamer["depths"] == 3  # dreamer-tiny loops its shared layer 3 times
    for r in range(3):
        assert 0.0 < dreamer[f"depth{r}/set_entropy_bits"] <= dreamer["set_entropy_max_bits"]
        assert 0.0 < dreamer[f"depth{r}/set_entropy_norm"] <= 1.0
    assert 2.0 <= dreamer["distinct_experts_per_token"] <= 6.0  # k .. min(E, R k)
    hydra = models["hydra-tiny-token"]["diversity"]
    assert hydra and all(0.0 < d["set_entropy_norm"] <= 1.0 for d in hydra.values())
    assert not models["transformer-tiny"]["diversity"]  # no experts

    printed = capsys.readouterr().out
    assert "| dreamer-tiny |" in printed and "distinct experts per token" in printed


def test_tokens_to_threshold_is_the_first_point_reaching_it() -> None:
    curve = [{"tokens": 0, "accuracy": 0.1}, {"tokens": 5, "accuracy": 0.6},
             {"tokens": 9, "accuracy": 0.4}]  # fmt: skip
    assert bench.tokens_to_threshold(curve, "accuracy", 0.5) == 5
    assert bench.tokens_to_threshold(curve, "accuracy", 0.7) is None
    assert bench.uniform_distinct_experts(16, 2, 1) == pytest.approx(2.0)


def test_unknown_model_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not in the tiny set"):
        bench.main(["--model-scale", "tiny", "--models", "dreamer-29m", "--out",
                    str(tmp_path / "x.json")])  # fmt: skip
