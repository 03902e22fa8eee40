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

Every backend shares the permutation (``sort_by_expert``: a stable sort of the (token, slot)
pairs by expert) and the weighted fp32 scatter-add that combines them (``combine_pairs``); only
the expert matmuls on the sorted rows (``swiglu_experts``) differ. Expert parallelism sends the
sorted rows to the rank of their expert between the two. The megablocks path (CUDA only, not
tested here) runs ``grouped_gemm.ops.gmm``, the grouped GEMM megablocks' dMoE uses in its
grouped mode, on the sorted rows.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from kernels.backends import BackendUnavailableError, import_problem
from kernels.moe.ref import sorted_moe, swiglu_experts_grouped_mm, swiglu_experts_loop


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


def _load_grouped_gemm() -> object:
    """``grouped_gemm.ops`` (the grouped GEMM megablocks' dMoE uses), or ``BackendUnavailableError``."""
    for module, attr in (("megablocks.ops", "gather"), ("grouped_gemm", "ops")):
        problem = import_problem(module, attr)
        if problem is not None:
            raise BackendUnavailableError("moe", "megablocks", problem)
    return importlib.import_module("grouped_gemm").ops


# The torch loop and megablocks' grouped GEMM take the group sizes on the host. Traced, Dynamo
# would specialise on every count (a recompile per batch, then eager past the recompile limit),
# and an activation-checkpoint recompute could run another graph than its forward did, saving
# other tensors (CheckpointError). Left out of the graph they run the same eager code each time:
# one graph break per MoE layer; ``grouped_mm`` has none.
_swiglu_experts_loop_eager = torch.compiler.disable(swiglu_experts_loop)


@torch.compiler.disable
def _swiglu_experts_megablocks(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """megablocks' grouped GEMM (``grouped_gemm.ops.gmm``) over expert-sorted rows."""
    gg_ops = _load_grouped_gemm()
    batch_sizes = counts.cpu().to(torch.long)  # grouped_gemm takes the group sizes on the host
    w1, w3, w2 = (w.to(x_sorted.dtype) for w in (w1, w3, w2))
    hidden = F.silu(gg_ops.gmm(x_sorted, w1, batch_sizes)) * gg_ops.gmm(x_sorted, w3, batch_sizes)
    return gg_ops.gmm(hidden, w2, batch_sizes)  # [M, D]


def swiglu_experts(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """SwiGLU experts over rows already grouped by expert, on the chosen backend.

    This is the part of the op that expert parallelism runs on each rank, between dispatch and
    combine: the rows a rank receives are grouped by its local experts.

    Args:
        x_sorted: [M, D] rows grouped by expert (expert e owns the e-th contiguous slice).
        counts: [E] rows per expert (sums to M; zeros allowed).
        w1, w3: [E, D, F]; w2: [E, F, D].
        backend: ``torch`` | ``grouped_mm`` | ``megablocks``.

    Returns:
        [M, D] expert outputs, row for row, in the matmul dtype (autocast's, else x's).
    """
    if backend == "torch":
        return _swiglu_experts_loop_eager(x_sorted, counts, w1, w3, w2)
    if backend not in ("grouped_mm", "megablocks"):
        raise ValueError(f"unknown moe backend '{backend}'; known: torch, grouped_mm, megablocks")
    x_mm = x_sorted.to(_matmul_dtype(x_sorted))
    _check_cuda_bf16(x_mm, backend)
    if backend == "grouped_mm":
        return swiglu_experts_grouped_mm(x_mm, counts, w1, w3, w2)
    if x_mm.shape[0] == 0:  # connected to the inputs (see swiglu_experts_loop)
        return swiglu_experts_loop(x_mm, counts, *(w.to(x_mm.dtype) for w in (w1, w3, w2)))
    return _swiglu_experts_megablocks(x_mm, counts, w1, w3, w2)


def moe_experts(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """Dropless MoE expert compute on the chosen backend: sort, ``swiglu_experts``, combine.

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
    compute = functools.partial(swiglu_experts, backend=backend)
    return sorted_moe(x, expert_idx, weights, (w1, w3, w2), compute)
