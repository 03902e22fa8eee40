"""Smoke test of ``benchmarks/cp_volume.py`` on tiny shapes: the counted CP traffic of the real
``Mamba2Mixer`` equals the formula exactly, and the saved-tensor formula matches the measurement.

The benchmark is imported as ``benchmarks.cp_volume`` (a namespace package under the repository
root) rather than through ``load_benchmark``: its rank functions run in spawned gloo processes,
which must be able to import them by module name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from pretrain.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")
bench = importlib.import_module("benchmarks.cp_volume")

SHAPE = bench.SSMShape(n_heads=4, head_dim=8, d_state=16, n_groups=1, d_conv=4)


def test_counted_ssm_traffic_equals_the_formula_on_every_rank(tmp_path: Path) -> None:
    records = bench.count_ssm_traffic(SHAPE, [64, 128], 2, 1, 16, tmp_path)
    assert [r["length"] for r in records] == [64, 128]
    for r in records:
        assert r["counted_equals_formula"], r
        assert r["counted_per_rank"] == r["formula_per_rank"]
    # what the formula says: state S = 4 (H P N + H) bytes, halo W = 4 (K - 1) X (fp32 here)
    state, halo = 4 * (4 * 8 * 16 + 4), 4 * 3 * (32 + 2 * 16)
    first, last = records[0]["counted_per_rank"]
    assert first == {
        "cp/ssm_conv_halo/shift": halo,
        "cp/ssm_state/all_gather": state,
        "cp/ssm_state/all_gather_grad": 2 * state,
    }
    assert last["cp/ssm_conv_halo/shift_grad"] == halo and "cp/ssm_conv_halo/shift" not in last
    # the same bytes at both lengths: state passing does not grow with L
    assert records[0]["counted_per_rank"] == records[1]["counted_per_rank"]


def test_traffic_formulas_scale_as_stated() -> None:
    big = bench.SSMShape(n_heads=64, head_dim=64, d_state=128, n_groups=1, d_conv=4)
    state = 4 * (64 * 64 * 128 + 64)
    halo = 2 * 3 * (4096 + 256)
    assert bench.ssm_state_passing_total(big, 1, 8, 2) == 21 * state + 2 * halo
    a2a = [bench.megatron_all_to_all_bytes(big, 1, n, 8, 2) for n in (1024, 2048)]
    assert a2a[1] == 2 * a2a[0]
    assert a2a[0] == 2 * 7 / 8 * 128 * 2 * (3 * 4096 + 2 * 8 * 128 + 64)
    assert bench.input_all_gather_bytes(2048, 1, 1024, 8, 2) == 2 * 7 * 128 * 2048 * 2
    rows = bench.traffic_rows(big, 2048, [1024, 65536], 8, 1, [])
    assert rows[0]["state_passing_bytes"] == rows[1]["state_passing_bytes"]
    assert rows[0]["state_passing_source"] == "formula"


def test_saved_bytes_formula_matches_the_measured_slopes() -> None:
    tiny = load_config(bench.CONFIG_TINY).model
    lengths = (64, 128)
    measured = bench.measure_path_bytes_per_token(tiny, lengths)
    for key, row in bench.compare_slopes(tiny, measured, lengths).items():
        if row["formula"] is not None:  # workspace and PKM: measured only
            assert row["measured"] == pytest.approx(row["formula"], rel=1e-9), key
