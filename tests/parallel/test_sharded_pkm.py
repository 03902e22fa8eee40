"""Sharded PKM value tables (``parallel.pkm``) against one process, on 2 and 4 gloo ranks.

Layer level, one spawn per world size (shared with the context-parallel model checks): every
rank runs the one-process layer on the whole batch and the sharded layer on its rows, for 3
AdamW steps with fresh data each step. The rows hold repeated reads (duplicated tokens, inside a
rank and across ranks) and leave rows nobody reads (at most 192 reads of 256 rows). Checked on
every step:
- outputs (rtol 1e-5);
- the gradients of the value columns each rank holds, of the sub-keys, the query network and
  the norms (the replicated ones averaged over ranks as FSDP does): rtol 1e-4, atol 1e-6 on the
  first step; rtol 1e-3, atol 1e-5 later, when the parameters differ by rounding that Adam
  magnifies;
- the largest tensor allocated in the sharded forward and backward: at most one shard (the
  one-process layer allocates the whole table, so the check can fail);
- the bytes counted per collective (exact formulas).
After the steps: the parameters (atol 1e-5, a thousandth of one step of lr 1e-2; Adam's eps is
1e-3 so that a gradient that is zero up to rounding does not move by a whole step) and the key
usage summed over ranks. Layouts: the table over all ranks (2 and 4), and at world 4 over the 2
EP ranks of ``dp_shard=4, ep=2``, replicated over the 2 efsdp ranks (gradients summed there).

Training level (FSDP2 runs, where ``parallel.pkm_shard=fsdp`` is the default) lives with the other
parallel paths: ``test_distributed_training`` (2 ranks, checkpoints 2 -> 1, 1 -> 2, 2 -> 4),
``test_expert_parallel`` (world 4 with ep=2, the table over the EP ranks; HSDP) and
``test_context_parallel`` (cp=2 x fsdp 2, the table over all 4).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from benchmarks._measure import LargestTensor
from parallel.dims import PKM_SHARD_DIMS, ParallelDims
from parallel.mesh import ParallelMesh
from parallel.pkm import apply_pkm_parallel
from pretrain.config import ConfigError, load_config, resolve_parallel_dims
from pretrain.models.common.pkm import ProductKeyMemory
from pretrain.models.config import PKMConfig
from pretrain.optim import build_optimizer
from tests.parallel.cp_model_check import assert_passed
from tests.pretrain.trainer_helpers import TINY

D, ROWS_PER_RANK, T = 16, 2, 6
CFG = PKMConfig(after_blocks=[0], n_subkeys=16, top_k=2, n_heads=2, d_key=8)  # 256 rows
R, HK = CFG.n_subkeys**2, CFG.n_heads * CFG.top_k


def _layer() -> ProductKeyMemory:
    torch.manual_seed(0)
    return ProductKeyMemory(D, CFG).train()


def _batch(world: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * ROWS_PER_RANK, T, D, generator=gen)
    x[:, T // 2 :] = x[:, : T // 2]  # every row reads its first half's rows again
    x[-1] = x[0]  # the last rank reads what the first one does
    return x, torch.randn(world * ROWS_PER_RANK, T, D, generator=gen)


def _replicated(module: ProductKeyMemory) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if n != "values.weight"}


class _Failures:
    """Collects failed checks so every rank finishes its collectives before the test raises
    (a rank that stopped at its first failure would leave the others waiting)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str, **tol: float) -> None:
        try:
            torch.testing.assert_close(actual, expected, **tol)
        except AssertionError as err:
            self.messages.append(f"{what}: {err}")

    def true(self, condition: bool, what: str) -> None:
        if not condition:
            self.messages.append(what)

    def raise_any(self) -> None:
        assert not self.messages, "\n".join(self.messages)


def check_layout(rank: int, world: int, dims: ParallelDims, over: str) -> None:
    single, sharded = _layer(), _layer()
    mesh = ParallelMesh(dims, "cpu")
    tables = apply_pkm_parallel([sharded], mesh, over)
    n = dims.size_of(PKM_SHARD_DIMS[over])
    cols = sharded.d_value // n
    table_rank = mesh.table_mesh(over).get_local_rank()
    mine = slice(table_rank * cols, (table_rank + 1) * cols)
    assert tables == {sharded.values.weight}
    assert sharded.values.weight.to_local().shape == (R, cols)
    opt1, opt2 = (
        build_optimizer(m, lr=1e-2, weight_decay=0.1, pkm_value_lr=3e-2) for m in (single, sharded)
    )
    for group in (*opt1.param_groups, *opt2.param_groups):
        # Adam's first step is lr * sign(g): a gradient element that is zero up to rounding
        # (1e-7) would move by a full lr one way or the other; eps 1e-3 keeps rounding small
        group["eps"] = 1e-3
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    reference = dict(single.named_parameters())
    check = _Failures()
    for step in range(3):
        x_all, g_all = _batch(world, step)
        full = LargestTensor()
        with full:
            y1 = single(x_all)
            (y1 * g_all).sum().backward()
        mesh.comm.reset()
        part = LargestTensor()
        with part:
            y = sharded(x_all[rows])
            (world * (y * g_all[rows]).sum()).backward()
        check.true(full.numel >= R * sharded.d_value, "the control: one process has the table")
        check.true(part.numel <= R * cols, f"a tensor of {part.numel} > one shard {R * cols}")
        check.close(y, y1[rows], f"output, step {step}", rtol=1e-5, atol=1e-6)
        # after a step the parameters differ by rounding, which Adam magnifies a little
        grad_tol = {"rtol": 1e-4, "atol": 1e-6} if step == 0 else {"rtol": 1e-3, "atol": 1e-5}
        check.close(
            sharded.values.weight.grad.to_local(),
            single.values.weight.grad[:, mine],
            f"value gradient, step {step}",
            **grad_tol,
        )
        for name, p in _replicated(sharded).items():
            dist.all_reduce(p.grad)
            p.grad /= world
            check.close(p.grad, reference[name].grad, f"{name} gradient, step {step}", **grad_tol)
        check.messages += _counted_bytes_problems(mesh, n, dims)
        opt1.step(), opt2.step()
        opt1.zero_grad(), opt2.zero_grad()
    counts = single.usage_counts
    check.true((counts == 0).any() and (counts > 1).any(), "no unread or no repeated rows")
    check.true(sharded.key_usage() == single.key_usage(), "key usage over ranks")
    table = sharded.values.weight.full_tensor()
    check.close(table, single.values.weight, "values after 3 steps", atol=1e-5, rtol=0)
    for name, p in _replicated(sharded).items():
        check.close(p, reference[name], f"{name} after 3 steps", atol=1e-5, rtol=0)
    check.raise_any()


def _counted_bytes_problems(mesh: ParallelMesh, n: int, dims: ParallelDims) -> list[str]:
    """Counted bytes this rank sent in one forward and backward that differ from the formula."""
    tokens, stats = ROWS_PER_RANK * T, mesh.comm
    out_bytes = (n - 1) * tokens * (D // n) * 4
    replicas = dims.world_size // n
    shard_bytes = R * (D // n) * 4
    expected = {
        "pkm/all_gather": (n - 1) * tokens * HK * (4 + 4),  # int32 rows and fp32 weights
        "pkm/reduce_scatter": (n - 1) * tokens * HK * 4,
        "pkm/all_to_all": out_bytes,
        "pkm/all_to_all_grad": out_bytes,
        "pkm/replica_all_reduce": round(2 * (replicas - 1) / replicas * shard_bytes),
    }
    return [
        f"{key}: counted {stats.bytes.get(key, 0)} bytes, formula {value}"
        for key, value in expected.items()
        if stats.bytes.get(key, 0) != value
    ]


def _checks(world: int) -> dict[str, tuple]:
    checks = {"all_ranks": (check_layout, ParallelDims(dp_shard=world), "fsdp")}
    if world == 4:
        checks["ep_with_replicas"] = (check_layout, ParallelDims(dp_shard=4, ep=2), "ep")
    return checks


@pytest.fixture(scope="module")
def results(spawned_layer_checks: dict) -> dict[int, list[dict[str, str]]]:
    """One spawn per world size, shared with the context-parallel model checks
    (tests/parallel/conftest.py); per rank: name -> error."""
    return spawned_layer_checks


@pytest.mark.parametrize("world", [2, 4])
def test_table_over_all_ranks_matches_one_process(results: dict, world: int) -> None:
    assert_passed(results[world], "all_ranks")


def test_table_over_ep_ranks_with_replicas_matches_one_process(results: dict) -> None:
    assert_passed(results[4], "ep_with_replicas")


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (
            ("parallel.backend=fsdp2", "parallel.dp_shard=3"),
            3,
            "over 3 ranks, which does not divide model.pkm.d_value=64",
        ),
        (("parallel.backend=ddp", "parallel.pkm_shard=ep"), 2, "needs parallel.backend=fsdp2"),
        (("parallel.pkm_shard=rows",), 1, "parallel.pkm_shard: must be one of"),
    ],
    ids=["uneven_columns", "not_fsdp2", "unknown"],
)
def test_impossible_placements_are_config_errors(
    overrides: tuple[str, ...], world: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(TINY, list(overrides))
        resolve_parallel_dims(cfg, world)
