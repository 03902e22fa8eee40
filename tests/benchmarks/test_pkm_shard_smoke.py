"""Smoke test of ``benchmarks/pkm_shard.py``: on a tiny shape at world 2 the counted bytes of
``ShardedBagLookup`` and of the FSDP-style baseline equal their formulas, and the formulas scale
as the module docstring states (exact arithmetic at the hydra-1.6b shape). No timings checked.

The benchmark is imported as ``benchmarks.pkm_shard`` (a namespace package under the repository
root): its rank function runs in spawned gloo processes, which import it by module name.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
bench = importlib.import_module("benchmarks.pkm_shard")

TINY = bench.PKMShape(rows=256, d_value=16, n_heads=2, top_k=2, tokens=12)


def test_counted_bytes_equal_the_formulas_at_world_2(tmp_path: Path) -> None:
    (record,) = bench.measure({"tiny": TINY}, 2, 1, 0, tmp_path)
    assert record["counted_equals_formula"] == {"columns": True, "fsdp": True}, record
    reads, out = 12 * 4, 12 * (16 // 2) * 4  # N Hk; (n - 1) N (Dv / n) b at n = 2
    expected = {
        "pkm/all_gather": reads * 8,
        "pkm/all_to_all": out,
        "pkm/all_to_all_grad": out,
        "pkm/reduce_scatter": reads * 4,
    }
    assert record["counted_per_rank"]["columns"] == [expected, expected]
    table = 256 * 16 * 4 // 2  # (n - 1) / n R Dv b
    fsdp = {"fsdp/all_gather": table, "fsdp/all_gather_bwd": table, "fsdp/reduce_scatter": table}
    assert record["counted_per_rank"]["fsdp"] == [fsdp, fsdp]
    assert record["outputs_match"] and record["weight_grads_match"]
    # columns never allocates more than its shard; fsdp allocates the whole table
    largest = record["largest_bytes"]
    assert largest["columns"] <= record["one_shard_bytes"] < largest["fsdp"]
    assert largest["fsdp"] == record["full_table_bytes"] == 256 * 16 * 4


def test_formulas_scale_as_stated() -> None:
    s = bench.PKMShape.from_config(bench.CONFIGS["hydra-1.6b"])
    assert s == bench.PKMShape(rows=65536, d_value=2048, n_heads=4, top_k=32, tokens=65536)
    assert bench.PKMShape.from_config(bench.CONFIGS["hydra-1.6b-pkm1m"]) == replace(s, rows=1024**2)
    n, b = 8, 4
    cols, rows, fsdp = (
        f(s, n, 1) for f in (bench.columns_bytes, bench.rows_bytes, bench.fsdp_bytes)
    )
    # exact terms, 8 GPUs
    assert cols == {
        "pkm/all_gather": 7 * 65536 * 128 * 8,
        "pkm/all_to_all": 7 * 65536 * 256 * 4,
        "pkm/all_to_all_grad": 7 * 65536 * 256 * 4,
        "pkm/reduce_scatter": 7 * 65536 * 128 * 4,
    }
    assert sum(cols.values()) == 1_644_167_168
    assert fsdp == dict.fromkeys(
        ("fsdp/all_gather", "fsdp/all_gather_bwd", "fsdp/reduce_scatter"), 7 * 8192 * 2048 * 4
    )
    # the output exchange of columns is n times smaller than the partial sum of rows
    assert rows["rows/reduce_scatter"] == n * cols["pkm/all_to_all"]
    assert rows["rows/all_gather_grad"] == n * cols["pkm/all_to_all_grad"]
    assert rows["rows/all_gather"] == cols["pkm/all_gather"]
    # fsdp grows linearly with R; columns does not depend on R except through the replica term
    big = replace(s, rows=4 * s.rows)
    for r in (1, 8):
        assert sum(bench.fsdp_bytes(big, n, r).values()) == 4 * sum(
            bench.fsdp_bytes(s, n, r).values()
        )
        small_cols, big_cols = bench.columns_bytes(s, n, r), bench.columns_bytes(big, n, r)
        replica = "pkm/replica_all_reduce"
        assert {k: v for k, v in big_cols.items() if k != replica} == cols
        assert big_cols.get(replica, 0) == 4 * small_cols.get(replica, 0)
    assert bench.columns_bytes(s, n, 8)["pkm/replica_all_reduce"] == 2 * 7 * 65536 * 256 * 4 // 8
    # the crossover: fsdp's bytes equal columns' at R*
    cross = bench.crossover_rows(s, n)
    assert 3 * (n - 1) / n * cross * 2048 * b == pytest.approx(sum(cols.values()))
    # memory: the same state in every layout; fsdp's transient holds the table and its gradient
    assert bench.state_bytes(s, n) == 16 * 65536 * 2048 // 8
    output = 65536 * 2048 * 4
    assert bench.transient_bytes("fsdp", s, n) == 2 * 65536 * 2048 * 4 + output
    assert bench.transient_bytes("columns", s, n) == 8 * 65536 * 128 * 8 + 2 * output
    assert bench.transient_bytes("rows", s, n) == 8 * 65536 * 128 * 8 + 9 * output
