"""Smoke test of ``benchmarks/cache_bytes.py`` on the tiny configs: a real decode per family
sized like ``new_decode_cache`` and equal to the account; JSON, table and plot written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("cache_bytes.py")


def test_quick_run_measures_every_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cache_bytes.json"
    report = bench.main(["--quick", "--real-context", "70", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert out.with_suffix(".png").stat().st_size > 0
    families = report["families"]
    assert list(families) == list(bench.FAMILIES)
    for name, rec in families.items():
        real = rec["real"]
        assert real["context"] == 70 and real["layout_equals_sized"] and real["agrees"], name
        assert all(s["agrees"] for s in rec["sized"].values()), name
    sized = {name: rec["sized"] for name, rec in families.items()}
    # full attention grows with the context; the SSM's state does not
    assert (
        sized["transformer"]["1024"]["bytes"]["total"]
        == 4 * sized["transformer"]["256"]["bytes"]["total"]
    )
    assert sized["mamba2"]["1024"]["bytes"] == sized["mamba2"]["256"]["bytes"]
    # hydra-tiny's window (32) and summaries (8 x 16 tokens) are full by 256 tokens
    assert sized["hydra"]["1024"]["bytes"] == sized["hydra"]["256"]["bytes"]
    printed = capsys.readouterr().out
    assert "| hydra | 1,024 |" in printed and "| dreamer | 70 |" in printed
