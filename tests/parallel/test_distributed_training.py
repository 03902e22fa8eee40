"""Every parallel path against the single-process result, with 2 gloo ranks on CPU.

Tolerance: the same global batch gives the same losses and gradient norms up to fp32 summation
order (ranks reduce gradients in another order than one process sums them): rtol 1e-5 on losses,
1e-4 on grad norms (which also catch a wrong gradient scale, to which Adam itself is blind).
Parameters after 6 AdamW steps agree to atol 1e-4 (lr 3e-3: a few percent of one step), because
Adam divides by sqrt(v) and so magnifies rounding in elements whose gradients are near zero.
Resume within one layout is exact (bitwise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.pretrain.trainer_helpers import (
    ATTAMBA_TINY,
    DREAMER_FAST,
    DREAMER_TINY,
    logged_rows,
    losses,
    run_training,
)

# The MoE's balance loss, z-loss and bias update use statistics summed over every routing rank
# (``ChunkMoE.reducer``, installed by every backend), so they stay on: they are the same
# function of the global batch as in one process.
GLOBAL_BATCH_1 = ("train.batch_size=4",)
GLOBAL_BATCH_2 = ("train.batch_size=2",)  # 2 ranks x 2 = the same 4 rows per step
GLOBAL_BATCH_4 = ("train.batch_size=1",)


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_params.safetensors")


def table_shapes(run_dir: Path) -> list[list[int]]:
    """Shapes of rank 0's part of each PKM value table (the tiny table is [256, 64])."""
    return list(json.loads((run_dir / "table_shapes.json").read_text()).values())


def _grad_norms(run_dir: Path) -> list[float]:
    return [row["grad_norm"] for row in logged_rows(run_dir) if "grad_norm" in row]


def _assert_same_training(a: Path, b: Path) -> None:
    torch.testing.assert_close(
        torch.tensor(losses(a)), torch.tensor(losses(b)), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(_grad_norms(a)), torch.tensor(_grad_norms(b)), rtol=1e-4, atol=1e-6
    )
    pa, pb = _final_params(a), _final_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        torch.testing.assert_close(
            pa[name], pb[name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


DUMP = {"HYDRA_TEST_DUMP_PARAMS": "1"}


@pytest.fixture(scope="module")
def single_process(hydra_fast_one_process: Path) -> Path:
    """6 steps in one process on GLOBAL_BATCH_1 (tests/conftest.py: shared with the
    expert-parallel tests, the same run)."""
    return hydra_fast_one_process


FSDP2 = ("parallel.backend=fsdp2",)


@pytest.fixture(scope="module")
def fsdp2_two_ranks(hydra_fast_fsdp2_two_ranks: Path) -> Path:
    """6 steps on 2 FSDP2 ranks (the same global batch as ``single_process``; tests/conftest.py:
    shared with the export tests, the same run)."""
    return hydra_fast_fsdp2_two_ranks


@pytest.fixture(scope="module")
def fsdp2_stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped after step 3 with a checkpoint; copy it before resuming."""
    run_dir = tmp_path_factory.mktemp("fsdp2_stopped")
    run_training(run_dir, *GLOBAL_BATCH_2, *FSDP2, nproc=2, stop_at=3)
    return run_dir


def _copy_of(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


@pytest.mark.parametrize(
    "backend",
    [
        "parallel.backend=fsdp2",
        "parallel.backend=ddp",
        "parallel.backend=deepspeed parallel.deepspeed_config=configs/deepspeed/zero3.json",
    ],
    ids=["fsdp2", "ddp", "zero3"],
)
def test_two_ranks_match_one_process(
    tmp_path: Path, single_process: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if "fsdp2" in backend:
        tmp_path = request.getfixturevalue("fsdp2_two_ranks")
    elif "zero3" in backend:  # tests/conftest.py: the same run as the export tests'
        tmp_path = request.getfixturevalue("hydra_fast_zero3_two_ranks")
    else:
        run_training(tmp_path, *GLOBAL_BATCH_2, *backend.split(), nproc=2, env=DUMP)
    _assert_same_training(single_process, tmp_path)
    # FSDP2 splits the PKM table's columns over its 2 ranks (parallel.pkm_shard=fsdp)
    assert table_shapes(tmp_path) == [[256, 32] if "fsdp2" in backend else [256, 64]]
    logged = [row for row in logged_rows(tmp_path) if "pkm/L0/lookup_share" in row]
    assert logged and all(0 < r["pkm/L0/lookup_share"] < 1 for r in logged)
    assert all(0 < r["pkm/L0/key_usage"] <= 1 for r in logged)


@pytest.fixture(scope="module")
def attamba_single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("attamba_single")
    run_training(run_dir, *GLOBAL_BATCH_1, env=DUMP, config=ATTAMBA_TINY)
    return run_dir


@pytest.mark.parametrize(
    "backend",
    [
        "parallel.backend=fsdp2",
        "parallel.backend=deepspeed parallel.deepspeed_config=configs/deepspeed/zero2.json",
    ],
    ids=["fsdp2", "zero2"],
)
def test_attamba_on_two_ranks_matches_one_process(
    tmp_path: Path, attamba_single_process: Path, backend: str
) -> None:
    """The Attamba family trains through every backend unchanged (no family-specific code)."""
    run_training(
        tmp_path, *GLOBAL_BATCH_2, *backend.split(), nproc=2, env=DUMP, config=ATTAMBA_TINY
    )
    _assert_same_training(attamba_single_process, tmp_path)


@pytest.fixture(scope="module")
def dreamer_single_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dreamer_single")
    run_training(run_dir, *DREAMER_FAST, *GLOBAL_BATCH_1, env=DUMP, config=DREAMER_TINY)
    return run_dir


def test_dreamer_on_two_fsdp2_ranks_matches_one_process_gathering_its_shared_layer_once(
    tmp_path: Path, dreamer_single_process: Path
) -> None:
    """Dreamer's shared layer (looped 3 times) stays in FSDP2's root unit: its parameters are
    all-gathered once per step (6 steps: 6 times), not once per iteration, while the prelude
    and coda blocks are gathered for forward and again for backward."""
    env = {**DUMP, "HYDRA_TEST_COUNT_GATHERS": "1"}
    run_training(
        tmp_path, *DREAMER_FAST, *GLOBAL_BATCH_2, *FSDP2, nproc=2, env=env, config=DREAMER_TINY
    )
    _assert_same_training(dreamer_single_process, tmp_path)
    gathers = json.loads((tmp_path / "gathers.json").read_text())
    core = {name: n for name, n in gathers.items() if name.startswith("blocks.core.")}
    prelude = {name: n for name, n in gathers.items() if name.startswith("blocks.prelude0.")}
    assert core and set(core.values()) == {6}, core
    assert prelude and min(prelude.values()) >= 2 * 6, prelude  # the counter sees every gather
    logged = [row for row in logged_rows(tmp_path) if "moe/Lcore/distinct_experts_per_token" in row]
    assert logged and all("moe/Lcore/depth2/expert0" in row for row in logged)
    assert all(row["recurrence"] == 3 for row in logged)


def test_dreamer_on_two_ddp_ranks_matches_one_process(
    tmp_path: Path, dreamer_single_process: Path
) -> None:
    """DDP with the shared layer used 3 times per forward (one gradient per parameter)."""
    run_training(
        tmp_path,
        *DREAMER_FAST,
        *GLOBAL_BATCH_2,
        "parallel.backend=ddp",
        nproc=2,
        env=DUMP,
        config=DREAMER_TINY,
    )
    _assert_same_training(dreamer_single_process, tmp_path)


def test_two_rank_fsdp2_resume_is_exact(
    tmp_path: Path, fsdp2_two_ranks: Path, fsdp2_stopped: Path
) -> None:
    split = _copy_of(fsdp2_stopped, tmp_path / "split")
    run_training(split, *GLOBAL_BATCH_2, *FSDP2, nproc=2)
    assert losses(split) == losses(fsdp2_two_ranks)


def test_two_rank_zero2_resume_is_exact(tmp_path: Path, hydra_fast_zero2_two_ranks: Path) -> None:
    """The uninterrupted run is tests/conftest.py's (also the DeepSpeed checkpoint tests')."""
    zero2 = ("parallel.backend=deepspeed", "parallel.deepspeed_config=configs/deepspeed/zero2.json")
    run_training(tmp_path / "split", *GLOBAL_BATCH_2, *zero2, nproc=2, stop_at=3)
    run_training(tmp_path / "split", *GLOBAL_BATCH_2, *zero2, nproc=2)
    assert losses(tmp_path / "split") == losses(hydra_fast_zero2_two_ranks)


def test_checkpoint_moves_between_world_sizes(
    tmp_path: Path, single_process: Path, fsdp2_stopped: Path, hydra_fast_stopped_at_3: Path
) -> None:
    """FSDP2 with the PKM table split over 2, 1 or 4 ranks; every move resumes equal."""
    # 2 ranks -> 1 rank: model, optimizer and the data position carry over.
    two_then_one = _copy_of(fsdp2_stopped, tmp_path / "two_then_one")
    run_training(two_then_one, *GLOBAL_BATCH_1, env=DUMP)
    _assert_same_training(single_process, two_then_one)
    # 1 rank -> 2 ranks.
    one_then_two = _copy_of(hydra_fast_stopped_at_3, tmp_path / "one_then_two")  # GLOBAL_BATCH_1
    run_training(one_then_two, *GLOBAL_BATCH_2, *FSDP2, nproc=2, env=DUMP)
    _assert_same_training(single_process, one_then_two)
    # 2 ranks -> 4 ranks: each of the PKM table's 2 column shards is split in two.
    two_then_four = _copy_of(fsdp2_stopped, tmp_path / "two_then_four")
    run_training(two_then_four, *GLOBAL_BATCH_4, *FSDP2, nproc=4, env=DUMP)
    _assert_same_training(single_process, two_then_four)
    assert table_shapes(two_then_four) == [[256, 16]]
