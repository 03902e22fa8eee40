"""RMSNorm, optionally gated (``rmsnorm(x * silu(gate))``, Mamba-2's norm), as one autograd op.

Shape legend: N rows (tokens), E width, G groups of ``group_size`` channels (E = G * group_size).

The plain chain (``rms_norm_ref``) makes five or six [N, E] fp32 tensors and autograd keeps
about five of them for backward (the upcast input, silu(gate), their product, the normalised
value, ...). Here backward recomputes those from the saved inputs (kept in their own dtype: bf16
stays bf16) and the per-row 1/rms, and on CPU both directions run over cache-sized blocks of rows
(``blocking``), so the temporaries are block-sized. Math in fp32 (fp64 for fp64 inputs), the
forward's ops in the chain's order: the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu import elementwise as native
from kernels.cpu import runs_natively
from pretrain.models.common.blocking import block_rows, row_slices


def _wide_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, group_size))  # [n, G, group_size]


def _normed(g: torch.Tensor, r: torch.Tensor, group_size: int) -> torch.Tensor:
    """[n, E] ``g`` times its [n, G, 1] 1/rms, per group."""
    return (_grouped(g, group_size) * r).flatten(-2)


# Block temporaries are fresh tensors rather than ``out=`` buffers (Dynamo cannot trace ``out=``
# into a slice); the allocator hands the same few blocks back every time.
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, group_size, eps, out_dtype):  # noqa: ANN001, ANN205
        wide = _wide_dtype(x)
        N, E = x.shape
        w = weight.to(wide)
        out = x.new_empty((N, E), dtype=out_dtype)
        rstd = x.new_empty((N, E // group_size, 1), dtype=wide)  # 1 / rms per row and group
        for rows in row_slices(N, block_rows(N, 4 * E, x.device)):
            g = x[rows].to(wide)
            if gate is not None:
                g = F.silu(gate[rows].to(wide)).mul_(g)  # silu(gate) * x
            r = torch.rsqrt(_grouped(g, group_size).pow(2).mean(-1, keepdim=True) + eps)
            rstd[rows].copy_(r)
            out[rows].copy_(_normed(g, r, group_size).mul_(w))
        ctx.save_for_backward(x, gate, weight, rstd)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, gate, weight, rstd = ctx.saved_tensors
        gs, wide = ctx.group_size, _wide_dtype(x)
        N, E = x.shape
        w = weight.to(wide)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate = None
        if gate is not None:
            grad_gate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        grad_w = w.new_zeros(E)
        for rows in row_slices(N, block_rows(N, 4 * E, x.device)):
            xb, gb, r = x[rows].to(wide), grad_out[rows].to(wide), rstd[rows]
            g = xb
            if gate is not None:  # recompute g = x * silu(gate), keeping silu(gate)
                zb = gate[rows].to(wide)
                silu_z = F.silu(zb)
                g = xb * silu_z
            normed = _normed(g, r, gs)
            grad_w += (gb * normed).sum(0)
            d = gb * w  # d loss / d normed
            dot = _grouped(d * normed, gs).mean(-1, keepdim=True)
            # d loss / d g = r * (d - normed * mean(d * normed)), per group
            dg = _grouped(d.sub_(_grouped(normed, gs).mul_(dot).flatten(-2)), gs).mul_(r)
            dg = dg.flatten(-2)
            if gate is None:
                grad_x[rows].copy_(dg)
                continue
            grad_x[rows].copy_(dg * silu_z)
            grad_gate[rows].copy_(torch.ops.aten.silu_backward(dg.mul_(xb), zb))
        return grad_x, grad_gate, grad_w.to(weight.dtype), None, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``rmsnorm(x * silu(gate)) * weight`` over groups of ``group_size`` channels, in fp32.

    Args:
        x: [..., E] input, any float dtype (saved for backward as it is).
        weight: [E] gain.
        eps: added to the mean square.
        gate: optional [..., E] gate (any float dtype): the input becomes ``x * silu(gate)``.
        group_size: channels per normalised group (default E: the whole row).
        out_dtype: the result's dtype (default ``x.dtype``).

    Returns:
        [..., E] in ``out_dtype``; the math runs in fp32 (fp64 for fp64 ``x``).
    """
    shape, E = x.shape, x.shape[-1]
    if E % (group_size or E):
        raise ValueError(f"group_size {group_size} does not divide the width {E}")
    rows = x.reshape(-1, E)
    gate_rows = None if gate is None else gate.reshape(-1, E)
    out_dtype = out_dtype or x.dtype
    with torch.autocast(x.device.type, enabled=False):
        lib = runs_natively(rows, gate_rows, weight) if out_dtype == x.dtype else None
        if lib is not None:  # one fused pass per direction (kernels/cpu)
            out = native.RMSNorm.apply(lib, rows, gate_rows, weight, group_size or E, eps)
        else:
            out = _RMSNorm.apply(rows, gate_rows, weight, group_size or E, eps, out_dtype)
    return out.view(shape)


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    gate: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``rms_norm`` as the plain chain of ops (autograd through each); the tests' reference."""
    wide = _wide_dtype(x)
    g = x.to(wide)
    if gate is not None:
        g = g * F.silu(gate.to(wide))
    grouped = _grouped(g, group_size or x.shape[-1])
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.flatten(-2) * weight.to(wide)).to(out_dtype or x.dtype)
