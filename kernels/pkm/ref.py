"""Product-key memory ops (Lample et al. 2019): key search and weighted bag of value rows.

Pure PyTorch; these functions define the ops that a GPU kernel must reproduce.

Shape legend:
    N   queries (tokens, flattened over batch and time)
    H   memory heads
    Dk  query / full key size; each half has Dk/2 channels
    S   sub-keys per half (``n_subkeys``); the memory has R = S*S rows
    k   rows selected per head (``top_k``)
    Dv  value row size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_search_shapes(query: torch.Tensor, subkeys: torch.Tensor, top_k: int) -> None:
    if query.dim() != 3 or subkeys.dim() != 4 or subkeys.shape[1] != 2:
        raise ValueError(
            f"expected query [N, H, Dk] and subkeys [H, 2, S, Dk/2], got {tuple(query.shape)}"
            f" and {tuple(subkeys.shape)}"
        )
    n_heads, _, n_sub, d_half = subkeys.shape
    if query.shape[1] != n_heads or query.shape[2] != 2 * d_half:
        raise ValueError(
            f"query {tuple(query.shape)} does not match subkeys {tuple(subkeys.shape)}"
        )
    if not 1 <= top_k <= n_sub:
        raise ValueError(f"top_k={top_k} must be in 1..n_subkeys={n_sub}")


def pkm_topk_ref(
    query: torch.Tensor, subkeys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key search: the ``top_k`` full keys with the highest score, per query and head.

    A full key is the concatenation of one sub-key of each half, so its score is the sum of the
    two half scores. The best ``top_k`` full keys are always among the ``top_k x top_k`` sums of
    the per-half top-``top_k`` scores, which makes this search exact at a cost of O(S) instead of
    O(S^2) per query.

    Args:
        query: [N, H, Dk] queries.
        subkeys: [H, 2, S, Dk/2] sub-keys of the first and the second half, per head.
        top_k: k, rows selected per head (also the candidates kept per half).

    Returns:
        scores: [N, H, k] full-key scores, descending; differentiable w.r.t. query and subkeys.
        indices: [N, H, k] int64 rows ``i1 * S + i2`` of the selected keys.
    """
    _check_search_shapes(query, subkeys, top_k)
    n_sub, d_half = subkeys.shape[2], subkeys.shape[3]
    q1, q2 = query[..., :d_half], query[..., d_half:]
    scores1 = torch.einsum("nhd,hsd->nhs", q1, subkeys[:, 0])  # [N, H, S]
    scores2 = torch.einsum("nhd,hsd->nhs", q2, subkeys[:, 1])
    top1, idx1 = scores1.topk(top_k, dim=-1)  # [N, H, k]
    top2, idx2 = scores2.topk(top_k, dim=-1)
    cand = (top1[..., :, None] + top2[..., None, :]).flatten(-2)  # [N, H, k*k]
    scores, flat = cand.topk(top_k, dim=-1)  # [N, H, k]
    rows = idx1.gather(-1, flat // top_k) * n_sub + idx2.gather(-1, flat % top_k)
    return scores, rows


def pkm_select(
    query: torch.Tensor, subkeys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights of a multi-head PKM read: search, softmax over each head's k, flatten heads.

    The weights are a softmax over each head's ``top_k`` scores, computed in fp32 at least (fp64
    stays fp64). Heads are flattened into one bag per query, so one ``pkm_lookup_ref`` call
    returns the sum over heads.

    Args:
        query: [N, H, Dk] queries.
        subkeys: [H, 2, S, Dk/2] sub-keys.
        top_k: k, rows read per head.

    Returns:
        indices: [N, H*k] int64 value rows.
        weights: [N, H*k] weights; each head's k sum to 1.
    """
    scores, rows = pkm_topk_ref(query, subkeys, top_k)
    weights = F.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return rows.flatten(1), weights.flatten(1)


def pkm_lookup_ref(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted bag of value rows: ``out[n] = sum_j weights[n, j] * values[indices[n, j]]``.

    Defined by ``F.embedding_bag`` (mode ``sum``, dense gradient), whose backward gives the
    gradient of both the value table (a scatter-add into the selected rows) and the weights.

    Args:
        values: [R, Dv] value table.
        indices: [n, k] int64 (or int32) rows in 0..R-1 (repeats allowed).
        weights: [n, k] per-row weights; cast to the table's dtype.

    Returns:
        [n, Dv] in the table's dtype.
    """
    if indices.dim() != 2 or indices.shape != weights.shape:
        raise ValueError(
            f"expected indices and weights [n, k] of one shape, got {tuple(indices.shape)} and"
            f" {tuple(weights.shape)}"
        )
    return F.embedding_bag(
        indices,
        values,
        mode="sum",
        per_sample_weights=weights.to(values.dtype),
        sparse=False,
    )


def pkm_brute_force_ref(
    query: torch.Tensor, subkeys: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exhaustive search over all R = S*S full keys; for tests of ``pkm_topk_ref`` only.

    Args:
        query: [N, H, Dk] queries.
        subkeys: [H, 2, S, Dk/2] sub-keys; full key ``i1 * S + i2`` is
            ``cat(subkeys[h, 0, i1], subkeys[h, 1, i2])``.
        top_k: k, rows selected per head.

    Returns:
        scores: [N, H, k] descending; indices: [N, H, k] int64 rows.
    """
    _check_search_shapes(query, subkeys, top_k)
    n_heads, _, n_sub, d_half = subkeys.shape
    first = subkeys[:, 0, :, None, :].expand(n_heads, n_sub, n_sub, d_half)
    second = subkeys[:, 1, None, :, :].expand(n_heads, n_sub, n_sub, d_half)
    full_keys = torch.cat((first, second), dim=-1).reshape(n_heads, n_sub * n_sub, 2 * d_half)
    scores = torch.einsum("nhd,hrd->nhr", query, full_keys)  # [N, H, R]
    return scores.topk(top_k, dim=-1)
