"""MoE expert compute: the sorted path and grouped_mm against the per-(token, slot) loop ref."""

from __future__ import annotations

import pytest
import torch

from kernels.moe import (
    grouped_mm_problem,
    moe_experts_grouped_mm,
    moe_experts_loop_ref,
    moe_experts_sorted,
)


def _inputs(
    n: int, k: int, n_experts: int, d: int, f: int, used: list[int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """Random op inputs; slots pick only experts in ``used`` (others stay empty), repeats ok."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    pick = torch.randint(0, len(used), (n, k), generator=gen)
    expert_idx = torch.tensor(used, dtype=torch.long)[pick]
    weights = torch.rand(n, k, generator=gen, dtype=dtype)
    w1 = torch.randn(n_experts, d, f, generator=gen, dtype=dtype) / d**0.5
    w3 = torch.randn(n_experts, d, f, generator=gen, dtype=dtype) / d**0.5
    w2 = torch.randn(n_experts, f, d, generator=gen, dtype=dtype) / f**0.5
    return x, expert_idx, weights, w1, w3, w2


def _value_and_grads(fn, x, expert_idx, weights, w1, w3, w2, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w1, w3, w2)]
    xl, wl, w1l, w3l, w2l = leaves
    y = fn(xl, expert_idx, wl, w1l, w3l, w2l)
    if grad_out is None:
        y.sum().backward()
    else:
        (y * grad_out).sum().backward()
    return y.detach(), [t.grad for t in leaves]


CASES = [
    # n, k, E, used experts (others empty)
    (1, 1, 4, [2]),
    (7, 1, 5, [0, 3, 4]),
    (13, 2, 6, [1, 2, 5]),
    (23, 2, 4, [0, 1, 2, 3]),
]


@pytest.mark.parametrize("n,k,n_experts,used", CASES)
def test_sorted_matches_loop_ref_fp64(n: int, k: int, n_experts: int, used: list[int]) -> None:
    inputs = _inputs(n, k, n_experts, d=6, f=10, used=used, dtype=torch.float64, seed=n)
    grad_out = torch.randn(n, 6, dtype=torch.float64)
    y_ref, g_ref = _value_and_grads(moe_experts_loop_ref, *inputs, grad_out=grad_out)
    y, g = _value_and_grads(moe_experts_sorted, *inputs, grad_out=grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("x", "weights", "w1", "w3", "w2"), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")
    # empty experts get exactly zero weight gradient, used ones a nonzero one
    empty = [e for e in range(n_experts) if e not in used]
    assert all(g[2][e].abs().max() == 0 for e in empty)
    assert all(g[2][e].abs().max() > 0 for e in used)


@pytest.mark.parametrize("fn", [moe_experts_sorted, moe_experts_grouped_mm])
def test_backward_keeps_no_weighted_copy_and_no_silu_output(fn) -> None:
    """Kept for backward, per expert: its two projections and their gated product (not silu of
    the first as well); of the [M, D] pair rows: the gathered inputs and the expert outputs (not
    their weighted copy as well)."""
    n, k, E, d, f, used = 23, 2, 4, 8, 12, [0, 1, 2, 3]
    x, idx, weights, w1, w3, w2 = _inputs(n, k, E, d, f, used, torch.float32, seed=5)
    leaves = [t.requires_grad_() for t in (x, weights, w1, w3, w2)]
    saved: dict[int, torch.Tensor] = {}

    weights_storages = {t.untyped_storage().data_ptr() for t in leaves[2:]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights_storages:  # w1[e] etc.: views
            saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*leaves[:1], idx, *leaves[1:])
    hidden = [t for t in saved.values() if t.dim() == 2 and t.shape[-1] == f and t.shape[0] > 0]
    pair_rows = [t for t in saved.values() if tuple(t.shape) == (n * k, d)]
    experts = len(used) if fn is moe_experts_sorted else 1  # the loop: one slice per expert
    assert len(hidden) <= 3 * experts, [tuple(t.shape) for t in hidden]
    assert len(pair_rows) <= 2, [tuple(t.shape) for t in pair_rows]
    y.sum().backward()


def test_sorted_weights_scale_linearly_and_repeats_add() -> None:
    """Two slots on the same expert with weights a, b equal one slot with weight a + b."""
    x, _, _, w1, w3, w2 = _inputs(5, 2, 3, d=4, f=8, used=[1], dtype=torch.float64, seed=0)
    same = torch.full((5, 2), 1, dtype=torch.long)
    w = torch.rand(5, 2, dtype=torch.float64)
    y_two = moe_experts_sorted(x, same, w, w1, w3, w2)
    y_one = moe_experts_sorted(x, same[:, :1], w.sum(1, keepdim=True), w1, w3, w2)
    torch.testing.assert_close(y_two, y_one, rtol=1e-12, atol=1e-12)


def test_sorted_empty_input() -> None:
    x, idx, w, w1, w3, w2 = _inputs(0, 2, 3, d=4, f=8, used=[0], dtype=torch.float32, seed=0)
    y = moe_experts_sorted(x, idx, w, w1, w3, w2)
    assert y.shape == (0, 4)


def test_shape_errors() -> None:
    x, idx, w, w1, w3, w2 = _inputs(3, 2, 3, d=4, f=8, used=[0], dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="expert_idx"):
        moe_experts_sorted(x, idx[:, :1], w, w1, w3, w2)
    with pytest.raises(ValueError, match="w2"):
        moe_experts_sorted(x, idx, w, w1, w3, w2.transpose(1, 2))


needs_grouped_mm = pytest.mark.skipif(
    grouped_mm_problem(torch.zeros(1, 8), torch.zeros(1, 8, 16)) is not None,
    reason="torch.nn.functional.grouped_mm unavailable on CPU in this torch",
)


@needs_grouped_mm
@pytest.mark.parametrize("n,k,n_experts,used", CASES)
def test_grouped_mm_matches_loop_ref(n: int, k: int, n_experts: int, used: list[int]) -> None:
    """grouped_mm in fp32 against the loop reference in fp64, forward and backward."""
    inputs64 = _inputs(n, k, n_experts, d=8, f=16, used=used, dtype=torch.float64, seed=100 + n)
    grad_out = torch.randn(n, 8, dtype=torch.float64)
    y_ref, g_ref = _value_and_grads(moe_experts_loop_ref, *inputs64, grad_out=grad_out)
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    y, g = _value_and_grads(moe_experts_grouped_mm, *inputs32, grad_out=grad_out.float())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weights", "w1", "w3", "w2"), g, g_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


@needs_grouped_mm
def test_grouped_mm_sum_backward_and_bf16() -> None:
    """A zero-stride output gradient (``y.sum()``) and bf16 inputs both work."""
    inputs = _inputs(9, 2, 4, d=8, f=16, used=[0, 3], dtype=torch.float32, seed=1)
    y_ref, g_ref = _value_and_grads(moe_experts_sorted, *inputs)
    y, g = _value_and_grads(moe_experts_grouped_mm, *inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    bf16 = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    y16, g16 = _value_and_grads(moe_experts_grouped_mm, *bf16)
    assert torch.isfinite(y16).all() and all(torch.isfinite(t).all() for t in g16)
    torch.testing.assert_close(y16.float(), y_ref, rtol=5e-2, atol=5e-2)


def test_grouped_mm_rejects_unsupported_inputs() -> None:
    x, idx, w, w1, w3, w2 = _inputs(3, 2, 3, d=6, f=10, used=[0], dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="moe_experts_sorted"):
        moe_experts_grouped_mm(x, idx, w, w1, w3, w2)  # 6 * 4 bytes is not a multiple of 16
    x, idx, w, w1, w3, w2 = _inputs(3, 2, 3, d=8, f=16, used=[0], dtype=torch.float64, seed=0)
    with pytest.raises(ValueError, match="moe_experts_sorted"):
        moe_experts_grouped_mm(x, idx, w, w1, w3, w2)
