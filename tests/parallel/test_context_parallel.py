"""Context parallelism against one process, on 2 and 4 gloo ranks (CPU).

Model level (``cp_model_check``): every rank computes the one-process reference itself, then its
slice; logits and the loss to rtol 1e-5, every parameter's gradient (summed over the ranks) to
rtol 1e-4, for the tiny Hydra (every component), Mamba-2 and Transformer. Rows are packed with a
document boundary inside a slice, one exactly at a slice boundary and a document over three
slices; slices of 45 and 23 tokens are multiples of no chunk size (SSM 32, MoE 16, summaries 16,
workspace 32), and at cp=4 the attention window (32) reaches back over two slices.

Training level: the FAST tiny config (rows of 72 tokens, MoE balance loss and bias update on)
under torchrun with FSDP2 (and DDP), with data sharding, EP and activation checkpointing, against
one process on the same global batch; a checkpoint written at cp=2 resumes at cp=2 and at cp=1
with the losses of the uninterrupted run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kernels.ssd.ref import ssd_scan_chunked, ssd_scan_sequential
from kernels.ssd.state_passing import incoming_state, initial_state_output, slice_decay
from parallel.comm import CommStats
from parallel.context import ContextGroup
from tests.parallel.cp_model_check import assert_passed, check_model
from tests.parallel.test_distributed_training import DUMP, _assert_same_training, table_shapes
from tests.parallel.test_expert_parallel import GRADS, _assert_same_gradients
from tests.pretrain.trainer_helpers import logged_rows, run_training

TINY_MAMBA2 = (
    "model.vocab_size=128",
    "model.d_model=64",
    "model.n_layers=2",
    "model.ssm.d_state=16",
    "model.ssm.head_dim=16",
    "model.ssm.chunk_size=32",
)
TINY_TRANSFORMER = (
    "model.vocab_size=128",
    "model.d_model=64",
    "model.n_layers=2",
    "model.d_ff=128",
    "model.attention.n_heads=4",
)
# the model-level check has no routing reducer: balance statistics are tested in training runs
HYDRA_NO_AUX = ("model.moe.aux_loss_coef=0", "model.moe.z_loss_coef=0")
MODELS = {
    "hydra": ("hydra-tiny.yaml", HYDRA_NO_AUX),
    "hydra_token_routing": ("hydra-tiny.yaml", (*HYDRA_NO_AUX, "model.moe.routing=token")),
    "mamba2": ("mamba2-29m.yaml", TINY_MAMBA2),
    "transformer": ("transformer-29m.yaml", TINY_TRANSFORMER),
}


def _collectives(rank: int, world: int) -> None:
    """shift (1 and 2 hops), all_gather and all_reduce against their definitions, forward and
    backward; every collective runs before any comparison (see ``cp_model_check``)."""
    stats = CommStats()
    comm = ContextGroup(dist.group.WORLD, stats).begin()
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(world, 3, 5, generator=gen, dtype=torch.float64)  # every rank's input
    weights = torch.randn(world, 3, 5, generator=gen, dtype=torch.float64)  # every rank's dL/dout
    w_gather = torch.randn(world, world, 3, 5, generator=gen, dtype=torch.float64)
    x = values[rank].clone().requires_grad_(True)
    zeros = torch.zeros_like(x)
    got, want = [], []
    for hops in (1, 2):
        out = comm.shift(x, hops, "test")
        (grad,) = torch.autograd.grad(comm.tie((out * weights[rank]).sum()), x)
        # rank r receives r - hops's tensor; x of rank r reached r + hops, weighted there
        got += [out, grad]
        want += [
            values[rank - hops] if rank >= hops else zeros,
            weights[rank + hops] if rank + hops < world else zeros,
        ]
    # pass_on from rank 1: rank 2 gets it, rank 1 zeros, the others their own (and gradients)
    out = comm.pass_on(x, 1, "test")
    (grad,) = torch.autograd.grad(comm.tie((out * weights[rank]).sum() + 0 * x.sum()), x)
    got += [out, grad]
    want += [
        {1: zeros, 2: values[1]}.get(rank, values[rank]),
        {1: weights[2], 2: zeros}.get(rank, weights[rank]),
    ]
    gathered = comm.all_gather(x, "test")
    (grad,) = torch.autograd.grad(comm.tie((gathered * w_gather[rank]).sum()), x)
    got += [gathered, grad]
    want += [values, w_gather[:, rank].sum(0)]  # dL/dx_r: every rank's weight of slot r
    total = comm.all_reduce(x, "test")
    (grad,) = torch.autograd.grad(comm.tie((total * weights[rank]).sum()), x)
    got += [total, grad]
    want += [values.sum(0), weights.sum(0)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    nbytes = x.numel() * x.element_size()
    assert stats.bytes["cp/test/all_gather"] == (world - 1) * nbytes
    assert stats.messages["cp/test/shift"] == (rank + 1 < world) + (rank + 2 < world)
    assert stats.messages["cp/test/pass"] == (rank == 1)
    assert stats.messages["cp/test/pass_grad"] == (rank == 2)


def _checks(cp: int) -> dict[str, tuple]:
    checks = {name: (check_model, *MODELS[name]) for name in ("hydra", "mamba2", "transformer")}
    if cp == 4:
        checks["hydra_token_routing"] = (check_model, *MODELS["hydra_token_routing"])
        # no document boundary: some slices lie inside one workspace chunk (32 > 23 tokens)
        checks["hydra_one_document"] = (check_model, *MODELS["hydra"], False)
        checks["collectives"] = (_collectives,)
    return checks


@pytest.fixture(scope="module")
def cp_results(spawned_layer_checks: dict) -> dict[int, list[dict[str, str]]]:
    """Every model-level check, one spawn of ``cp`` ranks per degree (tests/parallel/conftest.py:
    the same spawn as the sharded-PKM checks); per rank: name -> error."""
    return spawned_layer_checks


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("model", ["hydra", "mamba2", "transformer"])
def test_model_under_cp_matches_one_process(cp_results: dict, model: str, cp: int) -> None:
    assert_passed(cp_results[cp], model)


def test_token_routing_under_cp4_matches_one_process(cp_results: dict) -> None:
    assert_passed(cp_results[4], "hydra_token_routing")


def test_unpacked_rows_under_cp4_give_every_rank_every_gradient(cp_results: dict) -> None:
    assert_passed(cp_results[4], "hydra_one_document")


def test_collectives_forward_and_backward_on_4_ranks(cp_results: dict) -> None:
    assert_passed(cp_results[4], "collectives")


def _ssd_inputs(seed: int, T: int = 40) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    b, H, P, G, N = 2, 4, 3, 2, 5
    x = torch.randn(b, T, H, P, generator=gen, dtype=torch.float64)
    dt = torch.rand(b, T, H, generator=gen, dtype=torch.float64) * 0.5 + 0.05
    A = -(torch.rand(H, generator=gen, dtype=torch.float64) + 0.2)
    B = torch.randn(b, T, G, N, generator=gen, dtype=torch.float64)
    C = torch.randn(b, T, G, N, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C


@pytest.mark.parametrize("seed", [0, 1])
def test_state_combine_matches_the_serial_scan(seed: int) -> None:
    """Slices scanned from zero, states folded by ``incoming_state`` and outputs corrected by
    ``initial_state_output`` = one sequential scan; forward and backward, packed documents
    (a boundary inside slice 1, one exactly at the start of slice 3)."""
    n, T = 4, 10
    inputs = [t.requires_grad_(True) for t in _ssd_inputs(seed, n * T)]
    x, dt, A, B, C = inputs
    seq_idx = torch.zeros(2, n * T, dtype=torch.long)
    seq_idx[0, 14:] = 1
    seq_idx[0, 30:] = 2
    seq_idx[1, 23:] = 1
    y_ref, h_ref = ssd_scan_sequential(x, dt, A, B, C, seq_idx=seq_idx)
    cols = [slice(r * T, (r + 1) * T) for r in range(n)]
    local = [
        ssd_scan_chunked(*(t[:, c] for t in (x, dt)), A, B[:, c], C[:, c], 4, seq_idx=seq_idx[:, c])
        for c in cols
    ]
    doc = seq_idx
    continues = [torch.zeros(2, dtype=torch.bool)] + [
        doc[:, c.start] == doc[:, c.start - 1] for c in cols[1:]
    ]
    first = [
        (doc[:, c] == doc[:, c.start : c.start + 1]) & k[:, None] for c, k in zip(cols, continues)
    ]
    log_decay = dt * A
    decays = torch.stack([slice_decay(log_decay[:, c], f[:, -1]) for c, f in zip(cols, first)])
    states = torch.stack([h for _, h in local])
    ys = []
    for r, c in enumerate(cols):
        h_in = incoming_state(states, decays, r)
        ys.append(local[r][0] + initial_state_output(C[:, c], log_decay[:, c], h_in, first[r]))
    y = torch.cat(ys, dim=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y * weight).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weight).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ training runs

# slices of 36 (cp=2): multiples of no chunk size; a held-out evaluation at steps 3 and 6
SEQ = ("train.seq_len=72", "train.eval_every=3", "train.eval_batches=1")
CP2 = ("parallel.backend=fsdp2", "parallel.cp=2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cp_reference")
    run_training(run_dir, *SEQ, env=GRADS)
    return run_dir


@pytest.fixture(scope="module")
def cp2_stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cp=2 for 3 of the 6 steps, then stopped with a checkpoint."""
    run_dir = tmp_path_factory.mktemp("cp2_stopped")
    run_training(run_dir, *SEQ, *CP2, nproc=2, stop_at=3, env=GRADS)
    return run_dir


def test_cp2_matches_one_process(one_process: Path, cp2_stopped: Path) -> None:
    _assert_same_gradients(one_process, cp2_stopped)
    row = logged_rows(cp2_stopped)[0]
    ref = logged_rows(one_process)[0]
    for key in ("loss", "aux_loss", "grad_norm"):
        torch.testing.assert_close(row[key], ref[key], rtol=1e-5, atol=1e-7)
    assert row["tokens"] == ref["tokens"]  # both CP ranks read the same rows: counted once
    # evaluation is token-weighted over both slices: the one-process figures
    evals = [[r for r in logged_rows(d) if "eval/loss" in r] for d in (cp2_stopped, one_process)]
    assert evals[0] and evals[0][0]["step"] == evals[1][0]["step"] == 3
    for key in ("eval/loss", "eval/tokens", "eval/answer_accuracy"):
        torch.testing.assert_close(evals[0][0][key], evals[1][0][key], rtol=1e-5, atol=1e-7)
    for key in ("ssm_state", "ssm_conv_halo", "attention_halo", "workspace_carry"):
        assert any(k.startswith(f"comm/cp/{key}/") and v > 0 for k, v in row.items()), key


@pytest.mark.parametrize("cp_after", [2, 1])
def test_cp2_checkpoint_resumes_at_cp(
    tmp_path: Path, one_process: Path, cp2_stopped: Path, cp_after: int
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(cp2_stopped, run_dir)
    layout = CP2 if cp_after == 2 else ()
    run_training(run_dir, *SEQ, *layout, nproc=cp_after, env=DUMP)
    _assert_same_training(one_process, run_dir)


def test_cp2_with_ddp_matches_one_process(tmp_path: Path, one_process: Path) -> None:
    run_training(tmp_path, *SEQ, "parallel.backend=ddp", "parallel.cp=2", nproc=2, env=GRADS)
    _assert_same_gradients(one_process, tmp_path)
    _assert_same_training(one_process, tmp_path)


@pytest.mark.parametrize(
    "layout",
    [
        ("parallel.dp_shard=2",),
        ("parallel.dp_shard=2", "parallel.ep=2", "train.activation_checkpointing=true"),
    ],
    ids=["cp2_x_fsdp2", "cp2_x_ep2_with_ac"],
)
def test_four_ranks_with_cp2_match_one_process(
    tmp_path: Path, one_process: Path, layout: tuple[str, ...]
) -> None:
    run_training(tmp_path, *SEQ, *CP2, "train.batch_size=2", *layout, nproc=4, env=GRADS)
    _assert_same_gradients(one_process, tmp_path)
    _assert_same_training(one_process, tmp_path)
    assert table_shapes(tmp_path) == [[256, 16]]  # the PKM table over dp_shard x cp
