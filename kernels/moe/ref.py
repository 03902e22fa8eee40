"""Dropless mixture-of-experts compute over SwiGLU experts stacked per expert.

Shape legend: n tokens, k expert slots per token, E experts, D model dim, F expert hidden dim,
M = n * k (token, slot) pairs.

Expert ``e`` maps a row ``x`` [D] to ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` [D]; the op
returns, for each token, the sum over its k slots of ``weights[i, j] * expert_{idx[i, j]}(x[i])``.
Weights are stacked: ``w1``, ``w3`` [E, D, F] and ``w2`` [E, F, D].

Three implementations of the same op, same signature:
- ``moe_experts_loop_ref``: the per-(token, slot) loop that defines the op (tests only).
- ``moe_experts_sorted``: the CPU path: pairs sorted by expert, one dense matmul per non-empty
  expert on its contiguous slice, scatter-added back. No capacity, nothing dropped.
- ``moe_experts_grouped_mm``: the same sorted layout fed to ``torch.nn.functional.grouped_mm``
  (one call per weight matrix instead of a Python loop over experts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.gating import silu_mul
from kernels.moe.grouped_mm import TORCH_GROUPED_MM, grouped_mm_traceable

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_shapes(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> None:
    n, d = x.shape
    n_experts, d_w, f = w1.shape
    if expert_idx.shape != weights.shape or expert_idx.dim() != 2 or expert_idx.shape[0] != n:
        raise ValueError(
            f"expert_idx {tuple(expert_idx.shape)} and weights {tuple(weights.shape)} must both be"
            f" [n={n}, k]"
        )
    if d_w != d or w3.shape != w1.shape or w2.shape != (n_experts, f, d):
        raise ValueError(
            f"expert weights must be w1, w3 [E, D={d}, F] and w2 [E, F, D]; got w1"
            f" {tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)}"
        )


def moe_experts_loop_ref(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Reference MoE expert compute: a Python loop over every (token, slot) pair.

    Defines the op; it is slow (n * k tiny matmuls) and meant for tests on tiny sizes.

    Args:
        x: [n, D] token features.
        expert_idx: [n, k] int64 expert of each slot (repeats allowed).
        weights: [n, k] combine weight of each slot.
        w1: [E, D, F] gate projection of each expert.
        w3: [E, D, F] up projection of each expert.
        w2: [E, F, D] down projection of each expert.

    Returns:
        [n, D] ``sum_j weights[i, j] * expert_{expert_idx[i, j]}(x[i])``.
    """
    _check_shapes(x, expert_idx, weights, w1, w3, w2)
    rows = []
    for i in range(x.shape[0]):
        acc = torch.zeros_like(x[i], dtype=torch.promote_types(x.dtype, weights.dtype))
        for j in range(expert_idx.shape[1]):
            e = int(expert_idx[i, j])
            hidden = F.silu(x[i] @ w1[e]) * (x[i] @ w3[e])
            acc = acc + weights[i, j] * (hidden @ w2[e])
        rows.append(acc)
    if not rows:
        return x.new_zeros(x.shape, dtype=torch.promote_types(x.dtype, weights.dtype))
    return torch.stack(rows)


def sort_by_expert(
    expert_idx: torch.Tensor, weights: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert.

    Returns:
        token_of_pair [M] (source token of each sorted pair), weight_of_pair [M] and
        counts [E] (pairs per expert; expert e owns the e-th contiguous slice).
    """
    flat_expert = expert_idx.reshape(-1)
    # stable: pairs of one expert keep token order, so results do not depend on sort internals
    order = torch.argsort(flat_expert, stable=True)
    token_of_pair = order // expert_idx.shape[1]
    weight_of_pair = weights.reshape(-1).index_select(0, order)
    return token_of_pair, weight_of_pair, expert_counts(expert_idx, n_experts)


def expert_counts(
    expert_idx: torch.Tensor, n_experts: int, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """[E] (token, slot) pairs per expert, each token's pairs counted ``token_weight`` [n] times
    (default once: int64 counts; else in the weight's dtype).

    A scatter-add rather than ``bincount``, whose length depends on the largest index: the shape
    is static, so the op traces into a compiled graph without a host sync.
    """
    flat = expert_idx.reshape(-1)
    if token_weight is None:
        ones = torch.ones_like(flat)
    else:
        ones = token_weight[:, None].expand(expert_idx.shape).reshape(-1)
    return ones.new_zeros(n_experts).index_add_(0, flat, ones)


def swiglu_experts_loop(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Each expert on its contiguous slice of expert-sorted rows: one matmul chain per expert.

    Args:
        x_sorted: [M, D] rows grouped by expert (expert e owns the e-th slice).
        counts: [E] rows per expert (sums to M).
        w1, w3: [E, D, F]; w2: [E, F, D].

    Returns:
        [M, D] expert outputs, row for row.
    """
    if x_sorted.shape[0] == 0:
        # no rows: still a result of the inputs, so that autograd reaches every rank's
        # collectives around it (expert parallelism's all-to-alls run in backward on all ranks)
        return silu_mul(x_sorted @ w1[0], x_sorted @ w3[0]) @ w2[0]
    outs = []
    start = 0
    # one host sync for the ragged sizes; the loop skips empty experts entirely
    for e, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        x_e = x_sorted[start : start + count]
        outs.append(silu_mul(x_e @ w1[e], x_e @ w3[e]) @ w2[e])
        start += count
    return torch.cat(outs)


def moe_experts_sorted(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Dropless MoE expert compute: sort pairs by expert, one matmul chain per non-empty expert.

    Args:
        x: [n, D] token features.
        expert_idx: [n, k] int64 expert of each slot (repeats allowed).
        weights: [n, k] combine weight of each slot.
        w1: [E, D, F] gate projection of each expert.
        w3: [E, D, F] up projection of each expert.
        w2: [E, F, D] down projection of each expert.

    Returns:
        [n, D] in the promoted dtype of the expert outputs and ``weights`` (so fp32 weights
        accumulate bf16 expert outputs in fp32 under autocast).
    """
    return sorted_moe(x, expert_idx, weights, (w1, w3, w2), swiglu_experts_loop)


def sorted_moe(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    compute: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """The MoE op around an expert compute on sorted rows: sort the pairs by expert, gather
    their rows, ``compute(x_sorted, counts, w1, w3, w2)``, weight and scatter-add them back."""
    w1, w3, w2 = experts
    _check_shapes(x, expert_idx, weights, w1, w3, w2)
    token_of_pair, weight_of_pair, counts = sort_by_expert(expert_idx, weights, w1.shape[0])
    x_sorted = x.index_select(0, token_of_pair)  # [M, D]
    out_sorted = compute(x_sorted, counts, w1, w3, w2)
    return combine_pairs(x, out_sorted, weight_of_pair, token_of_pair)


def combine_pairs(
    x: torch.Tensor,
    out_sorted: torch.Tensor,
    weight_of_pair: torch.Tensor,
    token_of_pair: torch.Tensor,
) -> torch.Tensor:
    """Scale the sorted expert outputs by their weights and scatter-add them onto their tokens.

    Args:
        x: [n, D] the token features (for the output's shape).
        out_sorted: [M, D] expert output of each sorted (token, slot) pair.
        weight_of_pair, token_of_pair: [M] from ``sort_by_expert``.

    Returns:
        [n, D] in the promoted dtype of the outputs and the weights.
    """
    # no early return for M = 0: the result stays connected to ``out_sorted``, so a rank with
    # no rows still runs the backward of the collectives that produced them
    return _WeightedScatterAdd.apply(out_sorted, weight_of_pair, token_of_pair, x.shape[0])


class _WeightedScatterAdd(torch.autograd.Function):
    """``zeros[n, D].index_add_(0, token, out * weight[:, None])``, keeping only ``out``, the
    weights and the indices for backward: autograd through the two ops also kept the weighted
    copy (``index_add_`` saves its source), one more [M, D] tensor per MoE layer."""

    @staticmethod
    def forward(ctx, out, weight, token, n_tokens):  # noqa: ANN001, ANN205
        dtype = torch.promote_types(out.dtype, weight.dtype)
        y = out.new_zeros((n_tokens, out.shape[1]), dtype=dtype)
        y.index_add_(0, token, out * weight[:, None])
        ctx.save_for_backward(out, weight, token)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out, weight, token = ctx.saved_tensors
        rows = grad.index_select(0, token)  # [M, D]: each pair's share of its token's gradient
        g_out = (rows * weight[:, None]).to(out.dtype) if ctx.needs_input_grad[0] else None
        g_weight = (rows * out).sum(-1).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return g_out, g_weight, None, None


def grouped_mm_problem(x: torch.Tensor, w1: torch.Tensor) -> str | None:
    """Why ``moe_experts_grouped_mm`` cannot run on these inputs, or None when it can.

    ``grouped_mm`` needs fp32/bf16/fp16 and row strides that are multiples of 16 bytes, i.e.
    D and F multiples of 4 (fp32) or 8 (bf16/fp16).
    """
    if TORCH_GROUPED_MM is None:
        return "this torch has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if x.dtype not in _GROUPED_MM_DTYPES:
        return f"grouped_mm supports {_GROUPED_MM_DTYPES}, got {x.dtype}"
    d, f = w1.shape[1], w1.shape[2]
    if (d * x.element_size()) % 16 or (f * x.element_size()) % 16:
        return f"grouped_mm needs D and F rows of 16-byte multiples; got D={d}, F={f}, {x.dtype}"
    return None


def moe_experts_grouped_mm(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Dropless MoE expert compute with ``grouped_mm`` over the expert-sorted pairs.

    Same op and signature as ``moe_experts_sorted``. The matmuls run in ``x.dtype`` (the weights
    are cast to it), since ``grouped_mm`` is not covered by autocast.

    Args:
        x: [n, D] token features (fp32, bf16 or fp16; see ``grouped_mm_problem``).
        expert_idx: [n, k] int64 expert of each slot.
        weights: [n, k] combine weight of each slot.
        w1: [E, D, F] gate projection of each expert.
        w3: [E, D, F] up projection of each expert.
        w2: [E, F, D] down projection of each expert.

    Returns:
        [n, D] in the promoted dtype of ``x`` and ``weights``.

    Raises:
        ValueError: when ``grouped_mm`` cannot run on these inputs (dtype, alignment, torch).
    """
    _check_shapes(x, expert_idx, weights, w1, w3, w2)
    problem = grouped_mm_problem(x, w1)
    if problem is not None:
        raise ValueError(f"moe_experts_grouped_mm: {problem}; use moe_experts_sorted")
    return sorted_moe(x, expert_idx, weights, (w1, w3, w2), swiglu_experts_grouped_mm)


def swiglu_experts_grouped_mm(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """``swiglu_experts_loop`` with one ``grouped_mm`` per weight matrix (runs in x's dtype).

    Raises:
        ValueError: when ``grouped_mm`` cannot run on these inputs (``grouped_mm_problem``).
    """
    problem = grouped_mm_problem(x_sorted, w1)
    if problem is not None:
        raise ValueError(f"swiglu_experts_grouped_mm: {problem}; use swiglu_experts_loop")
    if x_sorted.shape[0] == 0:
        return swiglu_experts_loop(x_sorted, counts, *(w.to(x_sorted.dtype) for w in (w1, w3, w2)))
    offs = counts.cumsum(0).to(torch.int32)  # end of each expert's slice; empty slices allowed
    w1, w3, w2 = (w.to(x_sorted.dtype) for w in (w1, w3, w2))
    if x_sorted.is_cuda:
        gmm = TORCH_GROUPED_MM
    else:  # the same CPU kernel, behind an op whose shapes trace in fp32 too (see grouped_mm.py)
        gmm = grouped_mm_traceable
    hidden = silu_mul(gmm(x_sorted, w1, offs=offs), gmm(x_sorted, w3, offs=offs))
    # grouped_mm's backward rejects zero-stride gradients (e.g. from y.sum()); the gradient that
    # reaches it here is always dense because combine_pairs multiplies by the per-pair weights
    return gmm(hidden, w2, offs=offs)  # [M, D]
