"""PKM kernel references: product-key search == exhaustive search; bag == dense gather-and-sum."""

from __future__ import annotations

import pytest
import torch

from kernels.pkm import pkm_brute_force_ref, pkm_lookup_ref, pkm_select, pkm_topk_ref


def _search_inputs(
    n: int, heads: int, n_sub: int, d_key: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(n, heads, d_key, generator=gen, dtype=torch.float64)
    subkeys = torch.randn(heads, 2, n_sub, d_key // 2, generator=gen, dtype=torch.float64)
    return query, subkeys


def _sorted_by_row(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows_sorted, order = rows.sort(dim=-1)
    return scores.gather(-1, order), rows_sorted


@pytest.mark.parametrize(
    ("heads", "n_sub", "top_k", "d_key", "seed"),
    [(3, 8, 4, 16, 0), (2, 8, 1, 8, 1), (4, 8, 8, 6, 2), (1, 5, 3, 4, 3)],
)
def test_topk_matches_brute_force(
    heads: int, n_sub: int, top_k: int, d_key: int, seed: int
) -> None:
    query, subkeys = _search_inputs(64, heads, n_sub, d_key, seed)
    scores, rows = pkm_topk_ref(query, subkeys, top_k)
    bf_scores, bf_rows = pkm_brute_force_ref(query, subkeys, top_k)
    assert rows.shape == (64, heads, top_k) and rows.dtype == torch.int64
    assert bool((rows >= 0).all()) and bool((rows < n_sub**2).all())
    scores, rows = _sorted_by_row(scores, rows)
    bf_scores, bf_rows = _sorted_by_row(bf_scores, bf_rows)
    assert torch.equal(rows, bf_rows)
    torch.testing.assert_close(scores, bf_scores, rtol=1e-12, atol=1e-12)


def test_select_weights_are_softmax_of_brute_force_scores() -> None:
    query, subkeys = _search_inputs(32, 3, 8, 16, seed=4)
    indices, weights = pkm_select(query, subkeys, 4)
    bf_scores, bf_rows = pkm_brute_force_ref(query, subkeys, 4)
    bf_weights = torch.softmax(bf_scores, dim=-1)
    assert indices.shape == weights.shape == (32, 12)
    got_w, got_rows = _sorted_by_row(weights.view(32, 3, 4), indices.view(32, 3, 4))
    want_w, want_rows = _sorted_by_row(bf_weights, bf_rows)
    assert torch.equal(got_rows, want_rows)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        weights.view(32, 3, 4).sum(-1), torch.ones(32, 3, dtype=torch.float64)
    )


def test_search_scores_gradient_matches_brute_force() -> None:
    query, subkeys = _search_inputs(16, 2, 8, 8, seed=5)
    cot = torch.randn(16, 2, 4, dtype=torch.float64)
    grads = []
    for search in (pkm_topk_ref, pkm_brute_force_ref):
        q, sk = query.clone().requires_grad_(), subkeys.clone().requires_grad_()
        scores, _ = search(q, sk, 4)  # both descending, so positions correspond
        (scores * cot).sum().backward()
        grads.append((q.grad, sk.grad))
    for got, want in zip(grads[0], grads[1]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _dense_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values[indices] * weights[..., None]).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lookup_matches_dense_forward_and_backward(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    rows, d_value, n, k = 20, 7, 13, 6
    values = torch.randn(rows, d_value, generator=gen, dtype=dtype)
    indices = torch.randint(0, rows, (n, k), generator=gen)
    indices[0, 1] = indices[0, 0]  # a row repeated inside one bag accumulates twice
    weights = torch.rand(n, k, generator=gen, dtype=dtype)
    cot = torch.randn(n, d_value, generator=gen, dtype=dtype)
    results = []
    for bag in (pkm_lookup_ref, _dense_bag):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        out = bag(v, indices, w)
        (out * cot).sum().backward()
        results.append((out, v.grad, w.grad))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    unused = torch.ones(rows, dtype=torch.bool)
    unused[indices.flatten()] = False
    assert bool((results[0][1][unused] == 0).all())


def test_shape_errors() -> None:
    query, subkeys = _search_inputs(4, 2, 8, 8, seed=7)
    with pytest.raises(ValueError, match="top_k"):
        pkm_topk_ref(query, subkeys, 9)
    with pytest.raises(ValueError, match="does not match"):
        pkm_topk_ref(query[:, :1], subkeys, 2)
    with pytest.raises(ValueError, match="one shape"):
        pkm_lookup_ref(torch.randn(5, 3), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2))
