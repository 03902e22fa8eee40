"""MoE expert compute with a choice of backend: ``torch``, ``grouped_mm`` or ``megablocks``.

Shape legend: n tokens, k expert slots per token, E experts, D model dim, F expert hidden dim,
M = n * k (token, slot) pairs.

Every backend computes the op of ``kernels/moe/ref.py`` (``moe_experts_loop_ref`` defines it):
``y[i] = sum_j weights[i, j] * expert_{expert_idx[i, j]}(x[i])`` with SwiGLU experts stacked in
``w1``, ``w3`` [E, D, F] and ``w2`` [E, F, D]. The combine weights are applied in their own dtype
(fp32 from the router) on every backend, so only the expert matmuls differ in precision.

Autocast: ``grouped_mm`` and megablocks' grouped GEMM are not covered by autocast, so under an
enabled autocast their matmuls run in the autocast dtype (bf16), as autocast would run the
``torch`` backend's matmuls; without autocast they run in x's dtype. On CUDA both need bf16
(torch's grouped_mm kernel and the CUTLASS grouped GEMM accept nothing else): a float32 input
outside autocast is an error there, never a silent cast.

The megablocks path (CUDA only, not tested here): megablocks' radix sort and histogram order the
(token, slot) pairs by expert, ``megablocks.ops.gather`` permutes the rows, and
``grouped_gemm.ops.gmm`` (the grouped GEMM megablocks' dMoE uses in its grouped mode) runs each
expert on its slice. The weighted un-permute is the same fp32 scatter-add as the other paths
(megablocks' ``scatter`` kernel would combine in the activation dtype).
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

from kernels.backends import BackendUnavailableError, import_problem
from kernels.moe.ref import _check_shapes, _combine, moe_experts_grouped_mm, moe_experts_sorted


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul of ``x`` (x's own dtype when autocast is off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_cuda_bf16(x: torch.Tensor, backend: str) -> None:
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        raise ValueError(
            f"moe backend '{backend}' needs bf16 matmuls on CUDA, got {x.dtype}: run under"
            " torch.autocast(dtype=torch.bfloat16) or use kernels.moe=torch"
        )


def _load_megablocks() -> tuple[object, object]:
    """(``megablocks.ops``, ``grouped_gemm.ops``), or ``BackendUnavailableError``."""
    for module, attr in (("megablocks.ops", "gather"), ("grouped_gemm", "ops")):
        problem = import_problem(module, attr)
        if problem is not None:
            raise BackendUnavailableError("moe", "megablocks", problem)
    mb_ops = importlib.import_module("megablocks.ops")
    return mb_ops, importlib.import_module("grouped_gemm").ops


def _moe_experts_megablocks(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """megablocks' permutation kernels + grouped GEMM; same op as ``moe_experts_sorted``."""
    _check_shapes(x, expert_idx, weights, w1, w3, w2)
    mb_ops, gg_ops = _load_megablocks()
    n_experts, top_k = w1.shape[0], expert_idx.shape[1]
    flat_expert = expert_idx.reshape(-1).int()  # [M], pair p = token * k + slot
    with torch.no_grad():
        end_bit = max(math.ceil(math.log2(n_experts)), 1)  # bits the radix sort must look at
        bin_ids, order = mb_ops.sort(flat_expert, end_bit)  # pairs sorted by expert
        counts = mb_ops.histogram(flat_expert, n_experts)  # [E] pairs per expert
        bins = mb_ops.inclusive_cumsum(counts, 0).reshape(-1)  # end of each expert's slice
    x_sorted = mb_ops.gather(x.contiguous(), order, bin_ids, bins, top_k)  # [M, D]
    batch_sizes = counts.cpu().to(torch.long)  # grouped_gemm takes the group sizes on the host
    w1, w3, w2 = (w.to(x.dtype) for w in (w1, w3, w2))
    hidden = F.silu(gg_ops.gmm(x_sorted, w1, batch_sizes)) * gg_ops.gmm(x_sorted, w3, batch_sizes)
    out = gg_ops.gmm(hidden, w2, batch_sizes)  # [M, D]
    order = order.long()
    token_of_pair = order // top_k
    weight_of_pair = weights.reshape(-1).index_select(0, order)
    return _combine(x, [out], weight_of_pair, token_of_pair)


def moe_experts(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Dropless MoE expert compute on the chosen backend.

    Args:
        x: [n, D] token features.
        expert_idx: [n, k] int64 expert of each slot (repeats allowed).
        weights: [n, k] combine weight of each slot.
        w1: [E, D, F] gate projection of each expert.
        w3: [E, D, F] up projection of each expert.
        w2: [E, F, D] down projection of each expert.
        backend: ``torch`` (sorted, one matmul chain per non-empty expert) | ``grouped_mm`` |
            ``megablocks``.

    Returns:
        [n, D] in the promoted dtype of the expert outputs and ``weights``.

    Raises:
        BackendUnavailableError: megablocks cannot be imported.
        ValueError: unknown backend, or inputs the backend's kernels do not accept.
    """
    if backend == "torch":
        return moe_experts_sorted(x, expert_idx, weights, w1, w3, w2)
    if backend == "grouped_mm":
        x_mm = x.to(_matmul_dtype(x))
        _check_cuda_bf16(x_mm, backend)
        return moe_experts_grouped_mm(x_mm, expert_idx, weights, w1, w3, w2)
    if backend == "megablocks":
        x_mm = x.to(_matmul_dtype(x))
        _check_cuda_bf16(x_mm, backend)
        return _moe_experts_megablocks(x_mm, expert_idx, weights, w1, w3, w2)
    raise ValueError(f"unknown moe backend '{backend}'; known: torch, grouped_mm, megablocks")
