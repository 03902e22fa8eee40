"""Expert parallelism (and HSDP) against one process, with 2 and 4 gloo ranks on CPU.

Every run trains the FAST tiny config (2 blocks, one MoE layer of 4 experts, top-2) on the same
global batch of 4 rows per micro-batch. The MoE's balance loss, z-loss and bias update use the
global batch's statistics (summed over the routing ranks), so they are on here, unlike in
``test_distributed_training.py``. Tolerances: losses rtol 1e-5, every parameter's first-step
gradient (gathered from its shards) rtol 1e-4, parameters after 6 AdamW steps as in
``test_distributed_training.py`` (Adam magnifies rounding where gradients are near zero).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch.train import main as train_main
from tests.parallel.test_distributed_training import DUMP, _assert_same_training, table_shapes
from tests.pretrain.trainer_helpers import FAST, TINY, logged_rows, run_training

GRADS = {**DUMP, "HYDRA_TEST_DUMP_GRADS": "1"}
EP2 = ("parallel.backend=fsdp2", "parallel.ep=2")
REFERENCE = Path(__file__).with_name("data") / "single_process_reference.json"


def _rows_per_rank(world: int, grad_accum: int = 1) -> tuple[str, ...]:
    return (f"train.batch_size={4 // world}", f"train.grad_accum={grad_accum}")


def _assert_same_gradients(a: Path, b: Path) -> None:
    ga, gb = (load_file(d / "first_grads.safetensors") for d in (a, b))
    assert ga.keys() == gb.keys() and any(".experts." in k for k in ga)
    for name in ga:
        torch.testing.assert_close(
            gb[name], ga[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture(scope="module")
def single_token_routing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("single_token")
    run_training(run_dir, *_rows_per_rank(1, 2), "model.moe.routing=token", env=GRADS)
    return run_dir


@pytest.fixture(scope="module")
def single_chunk_routing(hydra_fast_one_process: Path) -> Path:
    """One process, _rows_per_rank(1), GRADS: the run tests/conftest.py shares with
    ``test_distributed_training.py``."""
    return hydra_fast_one_process


def test_one_process_is_the_model_of_before(single_chunk_routing: Path) -> None:
    """ep=1 in one process: the numbers recorded before expert parallelism existed."""
    ref = json.loads(REFERENCE.read_text())
    rows = logged_rows(single_chunk_routing)
    for key in ("loss", "grad_norm", "aux_loss"):
        # bitwise on the machine that recorded it; 1e-6 leaves room for another CPU's kernels
        torch.testing.assert_close(
            torch.tensor([r[key] for r in rows], dtype=torch.float64),
            torch.tensor(ref[key], dtype=torch.float64),
            rtol=1e-6,
            atol=0,
        )


def test_ep2_chunk_routing_matches_one_process(tmp_path: Path, single_chunk_routing: Path) -> None:
    run_training(tmp_path, *_rows_per_rank(2), *EP2, nproc=2, env=GRADS)
    _assert_same_training(single_chunk_routing, tmp_path)
    _assert_same_gradients(single_chunk_routing, tmp_path)
    row = logged_rows(tmp_path)[0]
    # the load is over every routing rank: the two EP ranks computed all (token, slot) rows
    tokens = 4 * 64 * 2  # rows x seq_len x top_k
    assert row["moe/L1/tokens_ep_rank0"] + row["moe/L1/tokens_ep_rank1"] == tokens
    assert row["comm/ep/all_to_all/bytes"] > 0 and row["comm/ep/all_to_all/messages"] > 0


def test_ep2_token_routing_grad_accum_matches_one_process(
    tmp_path: Path, single_token_routing: Path
) -> None:
    run_training(
        tmp_path, *_rows_per_rank(2, 2), "model.moe.routing=token", *EP2, nproc=2, env=GRADS
    )
    _assert_same_training(single_token_routing, tmp_path)
    _assert_same_gradients(single_token_routing, tmp_path)


@pytest.mark.parametrize(
    "layout",
    # the PKM table over the 2 EP ranks (replicated over efsdp), or over dp_shard (replicated
    # over dp_replicate)
    ["parallel.dp_shard=4 parallel.pkm_shard=ep", "parallel.dp_replicate=2 parallel.dp_shard=2"],
    ids=["fsdp4_ep2_pkm_over_ep", "hsdp2x2_ep2"],
)
def test_four_ranks_match_one_process(
    tmp_path: Path, single_token_routing: Path, layout: str
) -> None:
    run_training(
        tmp_path,
        *_rows_per_rank(4, 2),
        "model.moe.routing=token",
        *EP2,
        *layout.split(),
        nproc=4,
        env=GRADS,
    )
    _assert_same_training(single_token_routing, tmp_path)
    _assert_same_gradients(single_token_routing, tmp_path)
    assert table_shapes(tmp_path) == [[256, 32]]
    # the replicas sum the table's gradient once per step, not once per micro-batch (2 here)
    rows = [r for r in logged_rows(tmp_path) if "loss" in r]
    assert [r.get("comm/pkm/replica_all_reduce/messages") for r in rows] == [1.0] * 6


def test_checkpoint_moves_between_ep_layouts(
    tmp_path: Path, single_chunk_routing: Path, hydra_fast_stopped_at_3: Path
) -> None:
    # EP=2 -> EP=1: experts, their Adam moments, the routing bias and the data position.
    run_training(tmp_path / "ep2_then_1", *_rows_per_rank(2), *EP2, nproc=2, stop_at=3)
    run_training(tmp_path / "ep2_then_1", *_rows_per_rank(1), env=DUMP)
    _assert_same_training(single_chunk_routing, tmp_path / "ep2_then_1")
    # EP=1 -> EP=2
    # (the one-process run stopped after step 3, _rows_per_rank(1), from tests/conftest.py)
    shutil.copytree(hydra_fast_stopped_at_3, tmp_path / "ep1_then_2")
    run_training(tmp_path / "ep1_then_2", *_rows_per_rank(2), *EP2, nproc=2, env=DUMP)
    _assert_same_training(single_chunk_routing, tmp_path / "ep1_then_2")


@pytest.mark.parametrize(
    ("world", "overrides", "names"),
    [
        (2, ["parallel.backend=fsdp2", "parallel.dp_shard=4"], ["parallel.dp_shard=4", "is 2"]),
        (2, ["parallel.backend=fsdp2", "parallel.ep=3"], ["parallel.ep=3", "n_experts=4"]),
        (4, ["parallel.backend=fsdp2", "parallel.ep=4", "parallel.dp_replicate=2"], ["dp_shard=2"]),
        (2, ["parallel.backend=ddp", "parallel.ep=2"], ["parallel.ep=2", "parallel.backend=fsdp2"]),
        (
            2,
            ["parallel.backend=deepspeed", "parallel.ep=2"],
            ["parallel.backend=deepspeed", "fsdp2"],
        ),
        (
            2,
            ["parallel.backend=fsdp2", "parallel.cp=2", "train.seq_len=65"],
            ["train.seq_len=65", "parallel.cp=2"],
        ),
        (2, ["parallel.backend=deepspeed", "parallel.cp=2"], ["parallel.cp=2", "ddp or fsdp2"]),
    ],
    ids=["product", "n_experts", "ep_outside_dp", "ddp", "deepspeed", "cp_seq_len", "cp_deepspeed"],
)
def test_bad_layouts_exit_2_and_write_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    world: int,
    overrides: list[str],
    names: list[str],
) -> None:
    # rank 0 of `world` as a launcher sets it up: the layout is checked before any process
    # group starts, so this runs in the test process
    for key, value in (("RANK", "0"), ("WORLD_SIZE", str(world)), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # a layout let through fails, never waits
    run_dir = tmp_path / "run"
    args = ["--config", TINY, *FAST, f"run.dir={run_dir}", *overrides]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
    assert not run_dir.exists()
