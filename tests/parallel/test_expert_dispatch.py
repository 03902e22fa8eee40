"""The EP dispatcher inside one ``ChunkMoE`` on 2 gloo ranks against the layer in one process.

Each rank holds half the rows of a batch; the one-process layer sees them all. The objective on
rank r is ``2 * <y_r, g_r> + aux_r`` (data-parallel convention: the mean over ranks of the
per-rank objectives is the one-process objective ``<y, g> + aux``), so:
- outputs equal the one-process rows (rtol 1e-5), aux losses average to the one-process one;
- the router's gradient averaged over ranks equals the one-process gradient;
- each rank's expert gradient (already summed over the EP group, scaled by 1/ep) equals its
  slice of the one-process expert gradient; inputs' gradients equal (the combine path).
Cases: chunk and token routing, and a routing bias that sends every unit to experts 0 and 1,
so EP rank 1 (experts 2, 3) receives no row at all and sends all of its rows away.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.dims import ParallelDims
from parallel.expert import apply_expert_parallel
from parallel.mesh import ParallelMesh
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.config import MoEConfig
from tests.parallel.cp_model_check import assert_passed, spawn_checks

D, B, T = 8, 4, 12


def _layer(routing: str, skew: bool) -> ChunkMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(
        n_experts=4, top_k=2, d_expert=6, chunk_size=4, routing=routing, aux_loss_coef=0.01
    )
    moe = ChunkMoE(D, cfg)
    moe.init_weights(0.5)
    if skew:
        with torch.no_grad():
            moe.expert_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))
    return moe.train()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(B, T, D, generator=gen), torch.randn(B, T, D, generator=gen)


def _check_ranks(rank: int, world: int, routing: str, skew: bool) -> None:
    x_all, g_all = _data()
    single = _layer(routing, skew)
    x1 = x_all.clone().requires_grad_(True)
    y1, aux1 = single(x1)
    ((y1 * g_all).sum() + aux1).backward()

    moe = _layer(routing, skew)
    mesh = ParallelMesh(ParallelDims(dp_shard=world, ep=world), "cpu")
    apply_expert_parallel([moe], mesh)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    x = x_all[rows].clone().requires_grad_(True)
    y, aux = moe(x)
    (world * (y * g_all[rows]).sum() + aux).backward()

    # every collective first, then the comparisons: the cases run one after another in the same
    # ranks, and a rank that failed one must not leave the other waiting in a collective
    aux_mean = aux.detach().clone()
    dist.all_reduce(aux_mean)
    router = moe.router.weight.grad.clone()
    dist.all_reduce(router)
    sent, received = _rows_sent_and_received(moe, x, rank, world)

    torch.testing.assert_close(y, y1[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, world * x1.grad[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_mean / world, aux1.detach(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(router / world, single.router.weight.grad, rtol=1e-4, atol=1e-7)
    n_local = 4 // world
    for name in ("w1", "w3", "w2"):
        local = getattr(moe.experts, name).grad.to_local()
        full = getattr(single.experts, name).grad[rank * n_local : (rank + 1) * n_local]
        torch.testing.assert_close(local, full, rtol=1e-4, atol=1e-7, msg=name)
    if skew:  # the case this test is for: experts 2 and 3 saw no row on any rank
        assert single.experts.w1.grad[2:].abs().max() == 0
    _check_counted_bytes(mesh, sent, received, world)


def _rows_sent_and_received(
    moe: ChunkMoE, x: torch.Tensor, rank: int, world: int
) -> tuple[int, int]:
    """The (unit, expert) rows this rank sends to other ranks, and those it receives from them,
    for the routing that happened (an all-gather of every rank's counts)."""
    routing = moe.route(x.detach())
    owner = routing.expert_idx // (4 // world)  # [N, k] rank of each token's experts
    to_rank = torch.bincount(owner.flatten(), minlength=world)
    table = [torch.zeros_like(to_rank) for _ in range(world)]
    dist.all_gather(table, to_rank)
    sent = int(to_rank.sum() - to_rank[rank])
    received = sum(int(table[src][rank]) for src in range(world) if src != rank)
    return sent, received


def _check_counted_bytes(mesh: ParallelMesh, sent: int, received: int, world: int) -> None:
    """The dispatcher's byte count is the exact formula for the routing that happened:
    dispatch and combine-backward send this rank's rows away, combine and dispatch-backward
    send back the rows it received."""
    assert mesh.comm.bytes["ep/all_to_all"] == 2 * (sent + received) * D * 4
    assert mesh.comm.messages["ep/all_to_all"] == 4 * (world - 1)


CASES = {"chunk": ("chunk", False), "token": ("token", False), "empty_experts": ("chunk", True)}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Every case in one spawn of 2 ranks; per rank: case -> traceback or ""."""
    checks = {name: (_check_ranks, *case) for name, case in CASES.items()}
    return spawn_checks(2, checks, tmp_path_factory.mktemp("expert_dispatch"))


@pytest.mark.parametrize("case", list(CASES))
def test_dispatcher_matches_one_process(results: list[dict[str, str]], case: str) -> None:
    assert_passed(results, case)
