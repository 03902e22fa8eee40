"""The chunked SSD scan on CPU in bounded memory: the ``torch`` backend of ``kernels.ssd.op``.

Shape legend: b batch, T time, H heads, P head dim, G B/C groups, R = H // G heads per group,
N state size, K chunks in a block, L chunk length, c chunk, l/s positions in a chunk (t/source).

Same op and algorithm as ``kernels.ssd.ref.ssd_scan_chunked`` (Mamba-2's chunked SSD), but the
sequence is walked in blocks of K chunks and the backward is written by hand:

* forward: block by block, keeping only each block's entering state [b, H, P, N]; the state is
  passed from chunk to chunk by a sequential recurrence (no [c, c] matrix);
* backward: blocks in reverse order; each block's [L, L] decay and mix tensors are recomputed
  from the saved inputs and its entering state, and the state's gradient is carried backwards.

Saved for backward: the inputs and one state per block, O(T * state); transient: one block's
[b, K, H, L, L] tensors (K is chosen so that these stay near ``_BLOCK_ELEMENTS``). Autograd of
the chunked reference keeps every chunk's [L, L] tensors instead, O(T * L) per head.

Per chunk, with a = dt * A, decay D[l, s] = exp(a[s+1] + .. + a[l]) (0 across documents),
w[l] = exp(a[0] + .. + a[l]) (0 once the chunk's first document has ended) and xd = dt * x::

    y[l]     = sum_s (C_l . B_s) D[l, s] xd_s  +  w[l] C_l . h_c
    h_{c+1}  = w[L-1] h_c  +  sum_s D[L-1, s] xd_s (outer) B_s

Both directions are ``torch.library`` custom ops (with fake implementations), so a compiled
block keeps them as two opaque calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.ssd.ref import _accum_dtype, _check_inputs, _pad_time, _segsum, document_ids

# a block's [b, K, H, L, L] tensors hold about this many elements (1 MiB each in fp32): with 2
# threads 4-8 chunks of 64 for 16 heads ran fastest (1 or 64 chunks: 1.3x slower; 1 thread: flat)
_BLOCK_ELEMENTS = 1 << 18


def default_block_chunks(b: int, H: int, chunk_size: int) -> int:
    """Chunks per block: as many as keep one [b, K, H, L, L] tensor near ``_BLOCK_ELEMENTS``."""
    return max(1, _BLOCK_ELEMENTS // (b * H * chunk_size * chunk_size))


@dataclass
class _Block:
    """One block's inputs in the accumulation dtype, padded to K whole chunks, and its decays."""

    x: torch.Tensor  # [b, K, L, G, R, P]
    dt: torch.Tensor  # [b, K, L, G, R]
    xd: torch.Tensor  # [b, K, L, G, R, P] dt * x
    B: torch.Tensor  # [b, K, L, G, N]
    C: torch.Tensor  # [b, K, L, G, N]
    D: torch.Tensor  # [b, K, G, R, L, L] masked decay from s to l
    M: torch.Tensor  # [b, K, G, R, L, L] (C_l . B_s) * D
    w: torch.Tensor  # [b, K, G, R, L] masked decay from the chunk start to l


def _load_block(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    doc: torch.Tensor | None,
    t0: int,
    t1: int,
    L: int,
) -> _Block:
    """Positions t0 .. t1-1; a partial last chunk is padded with dt = 0 (decay 1, no input)."""
    b, _, H, P = x.shape
    G, N = B.shape[2:]
    R = H // G
    acc = _accum_dtype(x.dtype)
    pad = (t0 - t1) % L
    K = (t1 - t0 + pad) // L

    def load(t: torch.Tensor, *shape: int) -> torch.Tensor:
        return _pad_time(t[:, t0:t1].to(acc), pad).view(b, K, L, *shape)

    xb, dtb, Bb, Cb = load(x, G, R, P), load(dt, G, R), load(B, G, N), load(C, G, N)
    a = (dtb * A.to(acc).view(G, R)).permute(0, 1, 3, 4, 2)  # [b, K, G, R, L]
    w = torch.exp(a.cumsum(dim=-1))
    doc_l = None
    if doc is not None:
        doc_b = _pad_time(doc[:, t0:t1], pad, replicate=True).view(b, K, L)
        # document just before each chunk (the initial state belongs to document 0)
        before = torch.cat([doc[:, max(t0 - 1, 0), None], doc_b[:, :-1, -1]], dim=1)  # [b, K]
        doc_l = doc_b[:, :, None, None, :]
        w = w * (doc_l == before[:, :, None, None, None]).to(acc)
    D = torch.exp(_segsum(a, doc_l))
    M = torch.einsum("bclgn,bcsgn->bcgls", Cb, Bb)[:, :, :, None] * D
    return _Block(x=xb, dt=dtb, xd=xb * dtb[..., None], B=Bb, C=Cb, D=D, M=M, w=w)


def _to_time_major(t: torch.Tensor) -> torch.Tensor:
    """[b, K, G, R, L] -> [b, K, L, G, R, 1], to scale per-position [.., G, R, P] tensors."""
    return t.permute(0, 1, 4, 2, 3)[..., None]


def _entering_states(blk: _Block, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering each chunk [b, K, G, R, P, N] and leaving the block [b, G, R, P, N].

    A sequential recurrence over chunks; ``unbind`` gives all chunks in one op (slicing in the
    loop would cost one op per chunk and per tensor).
    """
    w_end = _to_time_major(blk.D[..., -1, :])  # decay from s to the chunk's end
    local = torch.einsum("bcsgn,bcsgrp->bcgrpn", blk.B, blk.xd * w_end)
    h, entering = h_in, []
    for dec, state in zip(blk.w[..., -1].unbind(1), local.unbind(1)):
        entering.append(h)
        h = dec[..., None, None] * h + state
    return torch.stack(entering, dim=1), h


def _block_forward(blk: _Block, entering: torch.Tensor) -> torch.Tensor:
    """y of the block [b, K, L, G, R, P]: inside the chunks plus the entering states read out."""
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", blk.M, blk.xd)
    read = torch.einsum("bclgn,bcgrpn->bclgrp", blk.C, entering)
    return y + read * _to_time_major(blk.w)


def _write(dst: torch.Tensor, src: torch.Tensor, t0: int, t1: int) -> None:
    """Copy a block's [b, K, L, ...] result into positions t0 .. t1-1 of [b, T, ...] ``dst``."""
    dst[:, t0:t1] = src.reshape(dst.shape[0], -1, *dst.shape[2:])[:, : t1 - t0]


def _ssd_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    doc: torch.Tensor | None,
    chunk_size: int,
    block_chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [b, T, H, P], the final state and the states entering each block [b, n_blocks, H, P, N]."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    acc = _accum_dtype(x.dtype)
    span = block_chunks * chunk_size
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    states = x.new_empty((b, -(-T // span), H, P, N), dtype=acc)
    h = x.new_zeros((b, H, P, N), dtype=acc) if initial_state is None else initial_state.to(acc)
    h = h.unflatten(1, (G, -1))  # [b, G, R, P, N]
    for k, t0 in enumerate(range(0, T, span)):
        states[:, k] = h.flatten(1, 2)
        h = _forward_block(y, x, dt, A, B, C, doc, h, t0, min(t0 + span, T), chunk_size)
    return y, h.flatten(1, 2), states


def _forward_block(
    y: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    doc: torch.Tensor | None,
    h_in: torch.Tensor,
    t0: int,
    t1: int,
    L: int,
) -> torch.Tensor:
    """Writes y of positions t0 .. t1-1, returns the state leaving them; a function of its own
    so that the block's tensors are freed before the next block's are made."""
    blk = _load_block(x, dt, A, B, C, doc, t0, t1, L)
    entering, h_out = _entering_states(blk, h_in)
    _write(y, _block_forward(blk, entering), t0, t1)
    return h_out


def _segsum_grad(Q: torch.Tensor) -> torch.Tensor:
    """Gradient of log-decays a [..., L] from Q = grad * exp(segsum(a)) [..., L, L] (0 above
    the diagonal; its diagonal is overwritten).

    segsum[l, s] = a[s+1] + .. + a[l], so a[k] collects Q[l, s] over s < k <= l. Going from k to
    k+1 adds column k below the diagonal and drops row k left of it: an exclusive cumsum of
    column sums minus row sums, with no further [L, L] tensor. The diagonal, which no a[k]
    collects, is zeroed first: it is the largest entry and would cancel only up to rounding
    (a 2e-3 error in dA relative to its largest entry, with strong decays in fp32).
    """
    Q.diagonal(dim1=-2, dim2=-1).zero_()
    step = Q.sum(dim=-2) - Q.sum(dim=-1)
    return F.pad(step.cumsum(dim=-1)[..., :-1], (1, 0))


def _reverse_state_pass(
    blk: _Block, entering: torch.Tensor, g_read: torch.Tensor, g_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk recurrence backwards.

    Args:
        g_read: [b, K, G, R, P, N] gradient of each entering state through its read-out.
        g_out: [b, G, R, P, N] gradient of the state leaving the block.

    Returns:
        gradients of the states leaving each chunk [b, K, G, R, P, N], of each chunk's total
        decay w[L-1] [b, K, G, R] and of the state entering the block [b, G, R, P, N].
    """
    g, g_leave, g_dec = g_out, [], []
    decs, reads, enters = blk.w[..., -1].unbind(1), g_read.unbind(1), entering.unbind(1)
    for c in reversed(range(len(decs))):
        g_leave.append(g)
        g_dec.append((g * enters[c]).sum(dim=(-2, -1)))
        g = decs[c][..., None, None] * g + reads[c]
    return torch.stack(g_leave[::-1], dim=1), torch.stack(g_dec[::-1], dim=1), g


def _block_backward(
    blk: _Block, A: torch.Tensor, entering: torch.Tensor, gy: torch.Tensor, g_out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gradients of one block: x, dt, B, C [b, K, L, ..], A [G, R] and the entering state."""
    G, R = blk.w.shape[2:4]
    w_l = _to_time_major(blk.w)
    # read-out of the entering states: y += w[l] C_l . h_c
    gy_w = gy * w_l
    gC = torch.einsum("bclgrp,bcgrpn->bclgn", gy_w, entering)
    read = torch.einsum("bclgn,bcgrpn->bclgrp", blk.C, entering)
    g_w = (gy * read).sum(dim=-1).permute(0, 1, 3, 4, 2)  # [b, K, G, R, L]
    g_read = torch.einsum("bclgrp,bclgn->bcgrpn", gy_w, blk.C)
    g_leave, g_dec, g_in = _reverse_state_pass(blk, entering, g_read, g_out)
    g_w[..., -1] += g_dec
    # each chunk's own contribution to the state leaving it: sum_s D[L-1, s] xd_s B_s
    w_end = blk.D[..., -1, :]
    u = torch.einsum("bcgrpn,bcsgn->bcsgrp", g_leave, blk.B)
    g_xd = u * _to_time_major(w_end)
    g_w_end = (blk.xd * u).sum(dim=-1).permute(0, 1, 3, 4, 2)  # [b, K, G, R, L]
    gB = torch.einsum("bcgrpn,bcsgrp->bcsgn", g_leave, blk.xd * _to_time_major(w_end))
    # inside the chunks: y += sum_s M[l, s] xd_s
    g_xd = g_xd + torch.einsum("bcgrls,bclgrp->bcsgrp", blk.M, gy)
    dM = torch.einsum("bclgrp,bcsgrp->bcgrls", gy, blk.xd)
    dS = (dM * blk.D).sum(dim=3)  # scores are shared by the R heads of a group
    gC = gC + torch.einsum("bcgls,bcsgn->bclgn", dS, blk.B)
    gB = gB + torch.einsum("bcgls,bclgn->bcsgn", dS, blk.C)
    # log-decays a = dt * A, through D (w_end is its last row) and through w (a cumsum)
    Q = dM.mul_(blk.M)  # dM is done with
    Q[..., -1, :] += g_w_end * w_end
    gw = g_w * blk.w
    ga = _segsum_grad(Q) + gw.flip(-1).cumsum(dim=-1).flip(-1)  # [b, K, G, R, L]
    ga_l = _to_time_major(ga)[..., 0]  # [b, K, L, G, R]
    gdt = (g_xd * blk.x).sum(dim=-1) + ga_l * A.view(G, R)
    gA = (ga_l * blk.dt).sum(dim=(0, 1, 2))
    return g_xd * blk.dt[..., None], gdt, gB, gC, gA, g_in


def _ssd_backward(
    dy: torch.Tensor | None,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    doc: torch.Tensor | None,
    states: torch.Tensor,
    chunk_size: int,
    block_chunks: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients of x, dt, A, B, C and the initial state (all in the accumulation dtype)."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    acc = _accum_dtype(x.dtype)
    span = block_chunks * chunk_size
    grads = tuple(x.new_empty(t.shape, dtype=acc) for t in (x, dt, B, C))
    gA = A.new_zeros((G, H // G), dtype=acc)
    g = x.new_zeros((b, H, P, N), dtype=acc) if dfinal is None else dfinal.to(acc)
    g = g.unflatten(1, (G, -1))  # gradient of the state leaving the current block
    for k in reversed(range(states.shape[1])):
        t0, h_in = k * span, states[:, k].unflatten(1, (G, -1))
        g = _backward_block(
            grads, gA, dy, x, dt, A, B, C, doc, h_in, g, t0, min(t0 + span, T), chunk_size
        )
    gx, gdt, gB, gC = grads
    return gx, gdt, gA.flatten(), gB, gC, g.flatten(1, 2)


def _backward_block(
    grads: tuple[torch.Tensor, ...],
    gA: torch.Tensor,
    dy: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    doc: torch.Tensor | None,
    h_in: torch.Tensor,
    g_out: torch.Tensor,
    t0: int,
    t1: int,
    L: int,
) -> torch.Tensor:
    """Writes the gradients of x, dt, B, C at t0 .. t1-1 into ``grads``, adds A's to ``gA`` and
    returns the gradient of ``h_in``; the block's recomputed tensors die with the call."""
    acc = gA.dtype
    blk = _load_block(x, dt, A, B, C, doc, t0, t1, L)
    entering, _ = _entering_states(blk, h_in)
    if dy is None:
        gy = blk.x.new_zeros(blk.x.shape)
    else:
        gy = _pad_time(dy[:, t0:t1].to(acc), blk.x.shape[1] * L - (t1 - t0)).reshape(blk.x.shape)
    *block_grads, gA_k, g_in = _block_backward(blk, A.to(acc), entering, gy, g_out)
    for dst, src in zip(grads, block_grads):  # x, dt, B, C
        _write(dst, src, t0, t1)
    gA += gA_k
    return g_in


@torch.library.custom_op("hydra_kernels::ssd_bounded_fwd", mutates_args=())
def _ssd_bounded_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    doc: torch.Tensor | None,
    chunk_size: int,
    block_chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ssd_forward(x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks)


@_ssd_bounded_fwd.register_fake
def _ssd_bounded_fwd_fake(x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks):
    b, T, H, P = x.shape
    acc = _accum_dtype(x.dtype)
    n_blocks = -(-T // (chunk_size * block_chunks))
    state = (b, H, P, B.shape[-1])
    return (
        x.new_empty(x.shape),
        x.new_empty(state, dtype=acc),
        x.new_empty((b, n_blocks, *state[1:]), dtype=acc),
    )


@torch.library.custom_op("hydra_kernels::ssd_bounded_bwd", mutates_args=())
def _ssd_bounded_bwd(
    dy: torch.Tensor | None,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    doc: torch.Tensor | None,
    states: torch.Tensor,
    chunk_size: int,
    block_chunks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ssd_backward(dy, dfinal, x, dt, A, B, C, doc, states, chunk_size, block_chunks)


@_ssd_bounded_bwd.register_fake
def _ssd_bounded_bwd_fake(dy, dfinal, x, dt, A, B, C, doc, states, chunk_size, block_chunks):
    acc = _accum_dtype(x.dtype)
    grads = (t.new_empty(t.shape, dtype=acc) for t in (x, dt, A, B, C))
    return (*grads, states.new_empty((states.shape[0], *states.shape[2:])))


class _SSDScanBounded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks):  # noqa: ANN001
        y, final_state, states = torch.ops.hydra_kernels.ssd_bounded_fwd(
            x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks
        )
        ctx.save_for_backward(x, dt, A, B, C, doc, states)
        ctx.sizes = (chunk_size, block_chunks)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal):  # noqa: ANN001
        x, dt, A, B, C, doc, states = ctx.saved_tensors
        gx, gdt, gA, gB, gC, g_init = torch.ops.hydra_kernels.ssd_bounded_bwd(
            dy, dfinal, x, dt, A, B, C, doc, states, *ctx.sizes
        )
        g_init = None if ctx.init_dtype is None else g_init.to(ctx.init_dtype)
        grads = (gx.to(x.dtype), gdt.to(dt.dtype), gA.to(A.dtype), gB.to(B.dtype), gC.to(C.dtype))
        return (*grads, g_init, None, None, None)


def ssd_scan_bounded(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    block_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by the chunked algorithm in bounded memory; same op as ``ssd_scan_chunked``.

    Differentiable w.r.t. x, dt, A, B, C and initial_state; the backward keeps the inputs and one
    [b, H, P, N] state per block, and recomputes the rest one block at a time.

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes, already softplus'ed (> 0).
        A: [H] negative decay rates.
        B: [b, T, G, N] input projections (head h uses group h // (H // G)).
        C: [b, T, G, N] output projections.
        chunk_size: L, the chunk length.
        initial_state: [b, H, P, N] state before t = 0 (zeros if None); first document only.
        seq_idx: [b, T] document index per position (None: one document per row).
        block_chunks: chunks per block (None: ``default_block_chunks``).

    Returns:
        y [b, T, H, P] in x's dtype and final_state [b, H, P, N] in the accumulation dtype (fp32,
        or fp64 for fp64 inputs).
    """
    _check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if block_chunks is None:
        block_chunks = default_block_chunks(x.shape[0], x.shape[2], chunk_size)
    if block_chunks < 1:
        raise ValueError(f"block_chunks must be >= 1, got {block_chunks}")
    doc = None if seq_idx is None else document_ids(seq_idx)
    return _SSDScanBounded.apply(x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks)
