"""Triton weighted embedding bag for product-key memory reads, forward and backward.

The op is the one ``kernels/pkm/ref.py:pkm_lookup_ref`` defines::

    out[n] = sum_j weights[n, j] * values[indices[n, j]]                     [n, Dv]

Shape legend: R value rows, Dv value size, n bags (tokens), k rows per bag (heads * top_k),
M = n * k (bag, slot) pairs, nd = cdiv(Dv, BLOCK_D) column blocks.

Kernels (every product of sizes that can pass 2^31 is formed in int64: a 512^2 x 2048 table has
2^29 elements, and ``row * Dv`` or ``M * nd`` must never wrap):

- ``_bag_fwd_kernel``: one program per (token block, Dv block) gathers the k rows of each of its
  tokens and sums them with their weights in fp32 (fp64 for fp64 tables).
- ``_bag_bwd_kernel``: one program per (token block, Dv block) reads grad_out once and, per slot j,
  writes its partial ``<grad_out[n], values[idx[n, j]]>`` over its Dv block into a
  [nd, n, k] scratch that torch sums over nd afterwards (fixed order: deterministic); with
  ``SCATTER`` it also atomically adds ``weights[n, j] * grad_out[n]`` into the rows' gradient.
- ``_bag_bwd_sorted_kernel``: the deterministic value gradient. The M pairs are sorted by row
  (stable, so pairs of one row stay in (token, slot) order); one program per (row, Dv block)
  reduces its row's contiguous segment in that fixed order and writes the row exactly once
  (zeros for a row no bag read). No atomics: bitwise reproducible run to run.

Value gradient, the two paths. Neither builds a per-token dense [R, Dv] intermediate; both write
the [R, Dv] gradient of the table, which is what PyTorch keeps for a dense ``nn.Embedding``
parameter anyway (``sparse=False``), so it costs no memory beyond the parameter's own ``.grad``.

- atomic (``deterministic=False``): scatter-add into a zeroed [R, Dv] fp32 buffer, cast to the
  table's dtype at the end (bf16 atomics would round every partial sum). One pass, fused with the
  weight gradient, but the fp32 summation order of a row depends on scheduling, so the last bits
  of rows read by several bags vary run to run.
- sorted (``deterministic=True``): sort + bincount + a segmented reduction; one more gather of
  grad_out rows, no fp32 scratch table, same result every run.

``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``, PyTorch's one
switch. Block sizes are fixed (no autotuning), so the interpreter path (``TRITON_INTERPRET=1``,
CPU tensors, used by the tests) and the GPU path run the same programs; nothing here calls
``torch.cuda`` for CPU tensors. Forward and backward are ``torch.library`` custom ops
(``hydra_kernels::pkm_bag_fwd`` / ``pkm_bag_bwd``) with fake implementations, wrapped in an
``autograd.Function``, so ``torch.compile`` traces through the bag without graph breaks.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# Fixed launch configuration (never autotuned): [BLOCK_N, BLOCK_D] tiles of gathered rows, and
# BLOCK_E pairs per step of the sorted reduction.
_BLOCK_N = 32
_BLOCK_D = 128
_BLOCK_E = 16
_NUM_WARPS = 4

# Triton decides interpreter vs GPU compilation when a kernel is decorated, i.e. at this import.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _bag_fwd_kernel(
    values_ptr, idx_ptr, w_ptr, out_ptr,
    n, k, dv, s_v_r, s_v_d,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[n, d] = sum_j w[n, j] values[idx[n, j], d]; grid (cdiv(n, BLOCK_N), nd)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n
    tile_ok = row_ok[:, None] & (cols < dv)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for j in range(k):
        r = tl.load(idx_ptr + rows * k + j, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + rows * k + j, mask=row_ok, other=0.0).to(ACC)
        v = tl.load(
            values_ptr + r[:, None] * s_v_r + cols[None, :].to(tl.int64) * s_v_d,
            mask=tile_ok,
            other=0.0,
        )
        acc += w[:, None] * v.to(ACC)
    out = out_ptr + rows[:, None] * dv + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bag_bwd_kernel(
    values_ptr, idx_ptr, w_ptr, gout_ptr, gw_part_ptr, gv_ptr,
    n, k, dv, s_v_r, s_v_d,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """Weight-gradient partials and (SCATTER) atomic value gradient; grid (cdiv(n, BLOCK_N), nd).

    gw_part[d_blk, n, j] = sum_{d in d_blk} gout[n, d] values[idx[n, j], d]
    gv[idx[n, j], d] += w[n, j] gout[n, d]          (fp32/fp64 buffer, atomics)
    """
    pid_d = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n
    tile_ok = row_ok[:, None] & (cols < dv)[None, :]
    go = tl.load(gout_ptr + rows[:, None] * dv + cols[None, :], mask=tile_ok, other=0.0).to(ACC)
    gw_rows = gw_part_ptr + pid_d.to(tl.int64) * n * k + rows * k
    for j in range(k):
        r = tl.load(idx_ptr + rows * k + j, mask=row_ok, other=0).to(tl.int64)
        if WEIGHT_GRAD:
            v = tl.load(
                values_ptr + r[:, None] * s_v_r + cols[None, :].to(tl.int64) * s_v_d,
                mask=tile_ok,
                other=0.0,
            )
            tl.store(gw_rows + j, tl.sum(go * v.to(ACC), axis=1), mask=row_ok)
        if SCATTER:
            w = tl.load(w_ptr + rows * k + j, mask=row_ok, other=0.0).to(ACC)
            tl.atomic_add(
                gv_ptr + r[:, None] * dv + cols[None, :],
                w[:, None] * go,
                mask=tile_ok,
                sem="relaxed",
            )


@triton.jit
def _bag_bwd_sorted_kernel(
    pair_ptr, seg_ptr, w_ptr, gout_ptr, gv_ptr,
    k, dv,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """gv[r, d] = sum over pairs p of row r (sorted order) of w[p] gout[p // k, d]; grid (R, nd).

    ``pair_ptr`` holds the flat (bag * k + slot) positions sorted by row, ``seg_ptr`` [R + 1] the
    start of each row's segment in it.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dv
    start = tl.load(seg_ptr + row)
    end = tl.load(seg_ptr + row + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < end
        pair = tl.load(pair_ptr + e, mask=e_ok, other=0)
        w = tl.load(w_ptr + pair, mask=e_ok, other=0.0).to(ACC)
        go = tl.load(
            gout_ptr + (pair // k)[:, None] * dv + cols[None, :],
            mask=e_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(w[:, None] * go.to(ACC), axis=0)
    tl.store(gv_ptr + row * dv + cols, acc.to(gv_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- launchers


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every tensor a kernel must fill completely is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc_dtype(values: torch.Tensor) -> tuple[torch.dtype, tl.dtype]:
    """Accumulation dtype: fp32, or fp64 for fp64 tables (as torch and tl dtypes)."""
    if values.dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _block_d(dv: int) -> int:
    return min(_BLOCK_D, max(16, triton.next_power_of_2(dv)))


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU; nothing (and no torch.cuda call) for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_inputs(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    if values.dim() != 2:
        raise ValueError(f"values must be [R, Dv], got {tuple(values.shape)}")
    if indices.dim() != 2 or indices.shape != weights.shape:
        raise ValueError(
            f"expected indices and weights [n, k] of one shape, got {tuple(indices.shape)} and"
            f" {tuple(weights.shape)}"
        )
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be int64 or int32, got {indices.dtype}")
    if not values.is_floating_point() or not weights.is_floating_point():
        raise ValueError(
            f"values and weights must be floating, got {values.dtype}, {weights.dtype}"
        )
    if len({values.device, indices.device, weights.device}) != 1:
        raise ValueError("values, indices and weights must be on one device")
    if not values.is_cuda and not INTERPRET:
        raise RuntimeError(
            "pkm_lookup_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before"
            " kernels.pkm.triton is first imported (to run the kernels in Triton's CPU interpreter)"
        )


def _bag_forward(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Launch the forward kernel: [n, Dv] in the table's dtype."""
    n, k = indices.shape
    dv = values.shape[1]
    out = _new_output((n, dv), values.dtype, values.device)
    if n == 0 or dv == 0:
        return out
    if k == 0:
        return out.zero_()
    _, acc = _acc_dtype(values)
    block_d = _block_d(dv)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(dv, block_d))
    with _device_guard(values):
        _bag_fwd_kernel[grid](
            values, indices, weights, out,
            n, k, dv, values.stride(0), values.stride(1),
            ACC=acc, BLOCK_N=_BLOCK_N, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out


def _bag_backward_fused(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    weight_grad: bool,
    scatter: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight gradient [n, k] (if ``weight_grad``) and atomic value gradient [R, Dv] (if ``scatter``).

    The value gradient comes back in the table's dtype, accumulated in an fp32 (fp64) buffer.
    """
    n, k = indices.shape
    rows, dv = values.shape
    acc_t, acc = _acc_dtype(values)
    block_d = _block_d(dv)
    nd = triton.cdiv(dv, block_d)
    dummy = values.new_empty(1, dtype=acc_t)
    gw_part = _new_output((nd, n, k), acc_t, values.device) if weight_grad else dummy
    gv = torch.zeros((rows, dv), dtype=acc_t, device=values.device) if scatter else dummy
    if n * k > 0 and dv > 0:
        grid = (triton.cdiv(n, _BLOCK_N), nd)
        with _device_guard(values):
            _bag_bwd_kernel[grid](
                values, indices, weights, grad_out, gw_part, gv,
                n, k, dv, values.stride(0), values.stride(1),
                ACC=acc, BLOCK_N=_BLOCK_N, BLOCK_D=block_d,
                WEIGHT_GRAD=weight_grad, SCATTER=scatter, num_warps=_NUM_WARPS,
            )  # fmt: skip
    grad_w = gw_part.sum(dim=0).to(weights.dtype) if weight_grad else None
    grad_v = gv.to(values.dtype) if scatter else None
    return grad_v, grad_w


def _bag_backward_sorted(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """Deterministic value gradient [R, Dv] in the table's dtype, by a sorted segmented sum."""
    n, k = indices.shape
    rows, dv = values.shape
    _, acc = _acc_dtype(values)
    grad_v = _new_output((rows, dv), values.dtype, values.device)
    if rows == 0 or dv == 0:
        return grad_v
    flat = indices.reshape(-1).to(torch.int64)
    # stable: a row's pairs keep their (bag, slot) order, so the reduction order is fixed
    sorted_rows, pair = torch.sort(flat, stable=True)
    # seg[r] = first sorted pair of row r; searchsorted (unlike bincount/cumsum on CUDA) is
    # allowed under torch.use_deterministic_algorithms, which is when this path runs
    all_rows = torch.arange(rows + 1, dtype=torch.int64, device=values.device)
    seg = torch.searchsorted(sorted_rows, all_rows)
    block_d = _block_d(dv)
    grid = (rows, triton.cdiv(dv, block_d))
    with _device_guard(values):
        _bag_bwd_sorted_kernel[grid](
            pair, seg, weights, grad_out, grad_v,
            k, dv,
            ACC=acc, BLOCK_E=_BLOCK_E, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return grad_v


def _bag_backward(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    need_values: bool,
    need_weights: bool,
    deterministic: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad_values [R, Dv] or None, grad_weights [n, k] or None)."""
    scatter = need_values and not deterministic
    grad_v = grad_w = None
    if need_weights or scatter:
        grad_v, grad_w = _bag_backward_fused(
            values, indices, weights, grad_out, weight_grad=need_weights, scatter=scatter
        )
    if need_values and deterministic:
        grad_v = _bag_backward_sorted(values, indices, weights, grad_out)
    return grad_v, grad_w


# ----------------------------------------------------------------------------- custom ops


# torch.library custom ops with fake (shape-only) implementations, so torch.compile traces a
# model through the bag without graph breaks and never looks inside the launchers.
@torch.library.custom_op("hydra_kernels::pkm_bag_fwd", mutates_args=())
def _pkm_bag_fwd(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    return _bag_forward(values, indices, weights)


@_pkm_bag_fwd.register_fake
def _pkm_bag_fwd_fake(values, indices, weights):  # noqa: ANN001, ANN202
    return values.new_empty((indices.shape[0], values.shape[1]))


@torch.library.custom_op("hydra_kernels::pkm_bag_bwd", mutates_args=())
def _pkm_bag_bwd(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    grad_out: torch.Tensor,
    need_values: bool,
    need_weights: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_v, grad_w = _bag_backward(
        values, indices, weights, grad_out, need_values, need_weights, deterministic
    )
    # a custom op returns tensors only: a gradient nobody asked for is a 0-element stand-in
    if grad_v is None:
        grad_v = values.new_empty(0)
    if grad_w is None:
        grad_w = weights.new_empty(0)
    return grad_v, grad_w


@_pkm_bag_bwd.register_fake
def _pkm_bag_bwd_fake(values, indices, weights, grad_out, need_values, need_weights, deterministic):  # noqa: ANN001, ANN202, E501
    grad_v = torch.empty_like(values, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(weights)
    return grad_v if need_values else values.new_empty(
        0
    ), grad_w if need_weights else weights.new_empty(0)


# ----------------------------------------------------------------------------- autograd


class _PKMLookup(torch.autograd.Function):
    """Weighted bag of value rows; gradients for ``values`` and ``weights`` (not ``indices``)."""

    @staticmethod
    def forward(ctx, values, indices, weights, deterministic):  # noqa: ANN001, ANN205
        out = torch.ops.hydra_kernels.pkm_bag_fwd(values, indices, weights)
        ctx.save_for_backward(values, indices, weights)
        ctx.deterministic = deterministic
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        values, indices, weights = ctx.saved_tensors
        need_values, _, need_weights, _ = ctx.needs_input_grad
        grad_v, grad_w = torch.ops.hydra_kernels.pkm_bag_bwd(
            values,
            indices,
            weights,
            grad_out.contiguous(),
            need_values,
            need_weights,
            ctx.deterministic,
        )
        return (grad_v if need_values else None), None, (grad_w if need_weights else None), None


def pkm_lookup_triton(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Weighted bag of value rows in Triton: ``out[n] = sum_j weights[n, j] * values[indices[n, j]]``.

    Same op and signature as ``pkm_lookup_ref`` (plus ``deterministic``), differentiable w.r.t.
    ``values`` and ``weights``. Sums run in fp32 (fp64 for fp64 tables); weights are read in
    their own dtype, not rounded to the table's first.

    Args:
        values: [R, Dv] value table (fp32, bf16, fp16 or fp64), any strides.
        indices: [n, k] int64 (or int32) rows in 0..R-1; repeats allowed, also inside one bag.
            Not range-checked (a check would cost a host sync): out-of-range rows read garbage.
        weights: [n, k] per-row weights.
        deterministic: value-gradient path: True = sorted segmented reduction (bitwise
            reproducible), False = fp32 atomics (one pass; last bits vary run to run), None =
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        [n, Dv] in the table's dtype. Its backward gives grad_values [R, Dv] (dense, like the
        gradient of an ``nn.Embedding`` with ``sparse=False``; rows no bag read are zero) in the
        table's dtype and grad_weights [n, k] in the weights' dtype.
    """
    _check_inputs(values, indices, weights)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _PKMLookup.apply(values, indices.contiguous(), weights.contiguous(), bool(deterministic))
