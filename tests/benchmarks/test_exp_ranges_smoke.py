"""Smoke test of ``benchmarks/exp_ranges.py``: every range timed, JSON written (no timing is
asserted: speed lives in the benchmark's output, not in tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")
bench = load_benchmark("exp_ranges.py")


def test_quick_run_times_every_range(tmp_path: Path) -> None:
    out = tmp_path / "exp.json"
    report = bench.main(["--elements", "4096", "--repeats", "1", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row["range"] for row in report["results"]] == list(bench.RANGES)
    for row in report["results"]:
        assert row["ns_per_element"] >= 0 and not math.isnan(row["ns_per_element"]), row
