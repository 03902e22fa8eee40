"""ChunkMoE: routing rule, causality, packed documents, aux losses, bias balancing, autocast."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.models.common.moe import ChunkMoE
from pretrain.models.config import MoEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8


def _moe(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> ChunkMoE:
    fields = dict(n_experts=5, top_k=2, d_expert=12, chunk_size=4, routing="chunk")
    fields.update(overrides)
    torch.manual_seed(seed)
    moe = ChunkMoE(D, MoEConfig(**fields))
    # a router std large enough that top-k choices are well separated and vary between units
    moe.init_weights(0.5)
    return moe.to(dtype)


def _expert(moe: ChunkMoE, e: int, x_t: torch.Tensor) -> torch.Tensor:
    ex = moe.experts
    return (F.silu(x_t @ ex.w1[e]) * (x_t @ ex.w3[e])) @ ex.w2[e]


@torch.no_grad()
def _reference_row(moe: ChunkMoE, x_row: torch.Tensor, unit_starts: list[int]) -> torch.Tensor:
    """Direct per-token loop: each unit routed on its first token, weights = renormalised scores."""
    cfg = moe.cfg
    bounds = unit_starts + [x_row.shape[0]]
    out = torch.zeros_like(x_row)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits = moe.router.weight @ x_row[start]
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        chosen = sorted(range(cfg.n_experts), key=lambda e: -float(scores[e] + moe.expert_bias[e]))
        chosen = chosen[: cfg.top_k]
        total = sum(scores[e] for e in chosen)
        for t in range(start, end):
            out[t] = sum(scores[e] / total * _expert(moe, e, x_row[t]) for e in chosen)
    return out


def _doc_unit_starts(doc_lengths: list[int], chunk: int) -> list[int]:
    starts, offset = [], 0
    for length in doc_lengths:
        starts += [offset + p for p in range(0, length, chunk)]
        offset += length
    return starts


def _seq_idx(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack(
        [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in rows]
    )


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_direct_reference(score_func: str, packed: bool) -> None:
    moe = _moe(score_func=score_func)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(5, dtype=torch.float64) * 0.3)  # bias steers selection
    rows = [[6, 2, 7], [15]] if packed else [[15], [15]]  # T = 15: last chunk is partial
    x = torch.randn(2, 15, D, dtype=torch.float64)
    y, _ = moe(x, _seq_idx(rows) if packed else None)
    for b, lengths in enumerate(rows):
        ref = _reference_row(moe, x[b], _doc_unit_starts(lengths, 4))
        torch.testing.assert_close(y[b], ref, rtol=1e-12, atol=1e-12)


def test_token_routing_matches_reference_and_ignores_documents() -> None:
    moe = _moe(routing="token")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    y, _ = moe(x)
    for b in range(2):
        torch.testing.assert_close(
            y[b], _reference_row(moe, x[b], list(range(7))), rtol=1e-12, atol=1e-12
        )
    y_packed, _ = moe(x, _seq_idx([[3, 4], [1, 6]]))
    torch.testing.assert_close(y_packed, y, rtol=0, atol=0)
    assert moe.route(x).expert_idx.shape == (14, 2)


@pytest.mark.parametrize("routing", ["chunk", "token"])
@pytest.mark.parametrize("packed", [False, True])
def test_causal(routing: str, packed: bool) -> None:
    moe = _moe(torch.float32, routing=routing)
    seq_idx = _seq_idx([[5, 8], [13]]) if packed else None
    x = torch.randn(2, 13, D)
    y, _ = moe(x, seq_idx)
    for t in (0, 2, 4, 6, 9, 11):
        x_pert = x.clone()
        x_pert[:, t + 1 :] += 5 * torch.randn_like(x_pert[:, t + 1 :])
        y_pert, _ = moe(x_pert, seq_idx)
        torch.testing.assert_close(y_pert[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(y_pert[:, t + 1 :], y[:, t + 1 :])


def test_chunk_routing_depends_only_on_first_token() -> None:
    moe = _moe(torch.float32, n_experts=8, top_k=2)
    x = torch.randn(3, 16, D)
    first = torch.zeros(16, dtype=torch.bool)
    first[::4] = True
    base = moe.route(x)
    x_rest = x.clone()
    x_rest[:, ~first] = 10 * torch.randn_like(x_rest[:, ~first])
    rest = moe.route(x_rest)
    assert torch.equal(rest.expert_idx, base.expert_idx)
    assert torch.equal(rest.weights, base.weights)
    # one decision per token, one counted unit per chunk (its first token)
    assert base.expert_idx.shape == (3 * 16, 2)
    assert torch.equal(base.counted, first.repeat(3))
    # the rule is not vacuous: moving the first tokens changes some chunk's experts
    x_first = x.clone()
    x_first[:, first] = 10 * torch.randn_like(x_first[:, first])
    assert not torch.equal(moe.route(x_first).expert_idx, base.expert_idx)
    # and every token of a chunk carries its chunk's decision
    per_chunk = base.expert_idx.view(3 * 4, 4, 2)
    assert torch.equal(per_chunk, per_chunk[:, :1].expand_as(per_chunk))


@pytest.mark.parametrize("routing", ["chunk", "token"])
def test_packed_equals_separate_documents(routing: str) -> None:
    moe = _moe(torch.float32, routing=routing)
    rows = [[5, 9, 3], [1, 11, 5], [17]]
    x = torch.randn(3, 17, D)
    y, _ = moe(x, _seq_idx(rows))
    for b, lengths in enumerate(rows):
        offset = 0
        for length in lengths:
            y_doc, _ = moe(x[b : b + 1, offset : offset + length])
            torch.testing.assert_close(
                y[b, offset : offset + length], y_doc[0], rtol=1e-5, atol=1e-6
            )
            offset += length
    if routing == "chunk":
        # a chunk straddling a boundary would have been routed on the old document's token
        y_unpacked, _ = moe(x)
        assert not torch.allclose(y_unpacked[0], y[0])


def test_aux_loss_values_and_gradients() -> None:
    moe = _moe(aux_loss_coef=0.3, z_loss_coef=0.0)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    routing = moe.route(x)
    _, aux = moe(x)
    units = routing.counted  # one token per chunk: the units the statistics average over
    assert units.sum() == 2 * 3
    probs = routing.logits[units].softmax(-1)
    chosen = routing.expert_idx[units]
    frac = torch.bincount(chosen.flatten(), minlength=5).double() / chosen.numel()
    torch.testing.assert_close(aux, 0.3 * 5 * (frac * probs.mean(0)).sum())
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0

    moe = _moe(aux_loss_coef=0.0, z_loss_coef=0.1)
    _, aux = moe(x)
    routing = moe.route(x)
    z = torch.logsumexp(routing.logits[routing.counted], -1).square().mean()
    torch.testing.assert_close(aux, 0.1 * z)
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0

    moe = _moe(aux_loss_coef=0.0, z_loss_coef=0.0)
    y, aux = moe(x)
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and aux.item() == 0.0
    (y.sum() + aux).backward()  # usable in the total loss either way


def test_router_gets_gradient_from_combine_weights() -> None:
    moe = _moe(torch.float32, aux_loss_coef=0.0, z_loss_coef=0.0)
    y, _ = moe(torch.randn(2, 8, D))
    y.square().sum().backward()
    for p in (moe.router.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bias_update_once_per_step_and_towards_balance() -> None:
    moe = _moe(torch.float32, routing="token", bias_update_rate=0.05, n_experts=4, top_k=1)
    with torch.no_grad():
        moe.router.weight[0] = 4.0 * moe.router.weight[1]  # skew: expert 0 wins half the tokens
    x = torch.randn(4, 16, D)

    def imbalance() -> float:
        load = torch.bincount(moe.route(x).expert_idx.flatten(), minlength=4).float()
        return float(load.max() / load.mean())

    moe.train()
    start = imbalance()
    y, _ = moe(x)
    single = moe.tokens_per_expert.clone()
    assert single.sum() == 4 * 16
    moe(x)  # second micro-batch: counts accumulate, bias untouched
    torch.testing.assert_close(moe.tokens_per_expert, 2 * single)
    assert torch.equal(moe.expert_bias, torch.zeros(4))
    assert moe.expert_load().sum() == 0  # no optimizer step yet
    moe.after_optimizer_step(stepped=False)  # a skipped step: counts dropped, bias untouched
    assert torch.equal(moe.expert_bias, torch.zeros(4)) and moe.tokens_per_expert.sum() == 0
    moe(x)
    moe(x)
    moe.after_optimizer_step(stepped=True)
    torch.testing.assert_close(moe.expert_load(), single / single.sum())
    torch.testing.assert_close(moe.expert_bias, 0.05 * torch.sign(single.mean() - single))
    assert moe.tokens_per_expert.sum() == 0
    moe(x)
    moe.after_optimizer_step(stepped=False)  # skipped: no load to report, bias unchanged
    assert moe.expert_load().sum() == 0
    torch.testing.assert_close(moe.expert_bias, 0.05 * torch.sign(single.mean() - single))
    bias_after_one = moe.expert_bias.clone()
    moe.after_optimizer_step(stepped=True)  # no forward since: nothing recorded, nothing moves
    assert torch.equal(moe.expert_bias, bias_after_one)
    for _ in range(40):
        moe(x)
        moe.after_optimizer_step(stepped=True)
    assert start >= 1.8 and imbalance() < 1.4
    # eval forwards do not record load
    moe.eval()
    moe(x)
    assert moe.tokens_per_expert.sum() == 0


def test_bias_changes_selection_not_combine_weights() -> None:
    moe = _moe(score_func="sigmoid")
    x = torch.randn(1, 8, D, dtype=torch.float64)
    base = moe.route(x)
    with torch.no_grad():
        moe.expert_bias[base.expert_idx[0, 0]] -= 100.0  # push the top expert of unit 0 out
    moved = moe.route(x)
    assert base.expert_idx[0, 0] not in moved.expert_idx[0]
    scores = base.logits.sigmoid()
    chosen = scores.gather(-1, moved.expert_idx)
    torch.testing.assert_close(moved.weights, chosen / chosen.sum(-1, keepdim=True))


def test_activation_checkpoint_recompute_counts_load_once() -> None:
    moe = _moe(torch.float32, routing="token").train()
    x = torch.randn(2, 8, D, requires_grad=True)
    y = checkpoint(lambda inp: moe(inp)[0], x, use_reentrant=False)
    y.sum().backward()
    assert moe.tokens_per_expert.sum() == 2 * 8 * 2


def test_a_copy_records_into_itself() -> None:
    """The load is recorded through a registry keyed per layer: a deep copy gets its own key, so
    its forwards count in the copy, never in the original (and the reverse)."""
    moe = _moe(torch.float32, routing="token").train()
    twin = copy.deepcopy(moe)
    assert int(twin.recorder_key) != int(moe.recorder_key)
    twin(torch.randn(1, 8, D))
    assert moe.tokens_per_expert.sum() == 0 and twin.tokens_per_expert.sum() == 8 * 2
    assert moe.last_selection is None and twin.last_selection.shape == (8, 2)
    moe(torch.randn(1, 4, D))
    assert moe.tokens_per_expert.sum() == 4 * 2 and twin.tokens_per_expert.sum() == 8 * 2


def test_bf16_autocast() -> None:
    moe = _moe(torch.float32, aux_loss_coef=0.01, z_loss_coef=1e-3).train()
    x = torch.randn(2, 13, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x, _seq_idx([[6, 7], [13]]))
    assert y.dtype == torch.float32 and aux.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(aux)
    (y.float().sum() + aux).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
    y32, _ = moe(x, _seq_idx([[6, 7], [13]]))
    assert (y - y32).abs().max() < 0.05 * y32.abs().max()  # bf16 matmuls, same routing


def test_meta_build_and_init_weights() -> None:
    cfg = MoEConfig(n_experts=3, top_k=1, d_expert=6, chunk_size=2)
    with torch.device("meta"):
        moe = ChunkMoE(D, cfg)
    moe.to_empty(device="cpu")
    moe.init_weights(0.02)
    assert moe.experts.w1.shape == (3, D, 6) and moe.experts.w2.shape == (3, 6, D)
    assert torch.equal(moe.expert_bias, torch.zeros(3))
    assert "expert_bias" in moe.state_dict() and "tokens_per_expert" not in moe.state_dict()
    assert moe.experts.w1.abs().max() <= 0.06 and 0.01 < moe.router.weight.std() < 0.04
    expected = {"router.weight", "experts.w1", "experts.w3", "experts.w2"}
    assert {n for n, _ in moe.named_parameters()} == expected
