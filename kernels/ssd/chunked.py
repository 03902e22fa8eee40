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

from kernels.ssd.head_parallel import HeadSlice, head_parts, join_heads, run_parts, sum_in_order
from kernels.ssd.ref import _accum_dtype, _check_inputs, _pad_time, document_ids

# a block's [b, K, H, L, L] tensors hold about this many elements (1 MiB each in fp32): with 2
# threads 4-8 chunks of 64 for 16 heads ran fastest (1 or 64 chunks: 1.3x slower; 1 thread: flat)
_BLOCK_ELEMENTS = 1 << 18


def default_block_chunks(b: int, H: int, chunk_size: int) -> int:
    """Chunks per block: as many as keep one [b, K, H, L, L] tensor near ``_BLOCK_ELEMENTS``."""
    return max(1, _BLOCK_ELEMENTS // (b * H * chunk_size * chunk_size))


@dataclass
class _Block:
    """One block's inputs in the accumulation dtype, chunk-major (chunks first, then batch, then
    the matmul's batch dims, then the chunk's positions), padded to K whole chunks, and the
    per-position decays. Chunk-major tensors make every product below a batched matmul over
    contiguous [L, ..] slices: the layout is changed once per block, not once per product."""

    x: torch.Tensor  # [K, b, G, R, L, P]
    dt: torch.Tensor  # [K, b, G, R, L]
    xd: torch.Tensor  # [K, b, G, R, L, P] dt * x
    B: torch.Tensor  # [K, b, G, L, N]
    C: torch.Tensor  # [K, b, G, L, N]
    cs: torch.Tensor  # [K, b, G, R, L] log-decay from the chunk start to l (a cumsum of dt * A)
    keep: torch.Tensor  # [L, L] or [K, b, 1, L, L] 1.0 where s <= l in l's document, else 0.0
    w: torch.Tensor  # [K, b, G, R, L] masked decay from the chunk start to l
    w_end: torch.Tensor  # [K, b, G, R, L] masked decay from s to the chunk's end


def _chunks(
    t: torch.Tensor, t0: int, t1: int, L: int, inner: tuple[int, ...], feature: bool, dtype
) -> torch.Tensor:
    """Positions t0 .. t1-1 of [b, T, ...] as chunk-major [K, b, *groups, L, (feature)] in
    ``dtype``, padded to whole chunks with zeros; ``inner`` splits the dims after time, whose
    last is a feature dim (kept last, after L) when ``feature``. One copy."""
    b, pad = t.shape[0], (t0 - t1) % L
    v = _pad_time(t[:, t0:t1].to(dtype), pad).view(b, -1, L, *inner)
    n = v.dim()
    groups = range(3, n - 1) if feature else range(3, n)
    return v.permute(1, 0, *groups, 2, *((n - 1,) if feature else ())).contiguous()


def _store(dst: torch.Tensor, src: torch.Tensor, t0: int, feature: bool) -> None:
    """Write chunk-major ``src`` [K, b, *groups, L, (feature)] into positions t0 .. t0 + K*L of
    ``dst`` [b, T', ...] (padded to whole chunks): the inverse of ``_chunks``."""
    n, K, L = src.dim(), src.shape[0], src.shape[-2 if feature else -1]
    groups = tuple(range(2, n - 2 if feature else n - 1))
    order = (1, 0, n - 2, *groups, n - 1) if feature else (1, 0, n - 1, *groups)
    view = src.permute(order)
    dst[:, t0 : t0 + K * L].view(view.shape).copy_(view)


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
    xb = _chunks(x, t0, t1, L, (G, R, P), True, acc)
    dtb = _chunks(dt, t0, t1, L, (G, R), False, acc)
    Bb, Cb = (_chunks(t, t0, t1, L, (G, N), True, acc) for t in (B, C))
    a = dtb * A.to(acc).view(G, R, 1)  # [K, b, G, R, L] log-decay of each step
    keep = torch.ones(L, L, dtype=acc, device=x.device).tril()
    if doc is None:
        cs = a.cumsum(dim=-1)
    else:
        pad = (t0 - t1) % L
        doc_c = _pad_time(doc[:, t0:t1], pad, replicate=True).view(b, -1, L).transpose(0, 1)
        keep = keep * (doc_c[..., :, None] == doc_c[..., None, :]).to(acc)  # [K, b, L, L]
        # cumsum within each document, as a product with the 0/1 mask: a later document's
        # log-decays never involve an earlier one's steps, not even through rounding, so a
        # packed row stays exactly its documents run one by one
        cs = torch.matmul(a.flatten(2, 3), keep.transpose(-1, -2)).view(a.shape)
        keep = keep[:, :, None]  # [K, b, 1, L, L]
    # log-decays between positions as differences of cs (as mamba_ssm's and our Triton kernels
    # do, but per document): exact enough in the accumulation dtype, and no [L, L] cumsum
    w = _exp_floored(cs)
    w_end = _exp_floored(cs[..., -1:] - cs)
    if doc is not None:
        # document just before each chunk (the initial state belongs to document 0)
        before = torch.cat([doc[None, :, max(t0 - 1, 0)], doc_c[:-1, :, -1]])  # [K, b]
        w = w * (doc_c == before[..., None])[:, :, None, None].to(acc)
        w_end = w_end * (doc_c == doc_c[..., -1:])[:, :, None, None].to(acc)
    return _Block(
        x=xb, dt=dtb, xd=xb * dtb[..., None], B=Bb, C=Cb, cs=cs, keep=keep, w=w, w_end=w_end
    )


# On CPU, exp of an argument below about -87 (a result under fp32's smallest normal number)
# or of -inf takes a slow path: 50-145x (-inf: 14x) the time of an in-range one (torch 2.13,
# AVX-512, flush-to-zero or not; benchmarks/exp_ranges.py). Decays are therefore floored at e^-80 (~2e-35, far below the
# rounding of any sum they join) and masked by multiplying with 0/1, never by -inf.
_LOG_FLOOR = -80.0


def _exp_floored(log: torch.Tensor) -> torch.Tensor:
    return torch.exp(log.clamp(min=_LOG_FLOOR))


def _decay(blk: _Block) -> torch.Tensor:
    """exp(cs[l] - cs[s]) [K, b, G, R, L, L], unmasked (``keep`` is applied to the scores):
    above the diagonal the argument is clamped to 0, below it floored."""
    seg = blk.cs[..., :, None] - blk.cs[..., None, :]
    return seg.clamp_(_LOG_FLOOR, 0.0).exp_()


def _scores(blk: _Block) -> torch.Tensor:
    """C_l . B_s [K, b, G, 1, L, L] where s <= l in l's document, else 0; shared by the R heads
    of a group, so masking here costs R times less than masking the decays."""
    return torch.matmul(blk.C, blk.B.transpose(-1, -2)).mul_(blk.keep)[:, :, :, None]


def _heads_last(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``t * w`` for t [K, b, G, R, L, P] and w [K, b, G, R, L], written as [K, b, G, L, R*P]:
    a group's heads side by side, so that products over a group's positions or state contract
    or produce all of its heads in one matmul (B and C are shared by the group) instead of
    broadcasting B or C to every head. The layout change rides on the product's own pass."""
    K, b, G, R, L, P = t.shape
    out = t.new_empty((K, b, G, L, R, P))
    torch.mul(t, w[..., None], out=out.transpose(3, 4))
    return out.view(K, b, G, L, R * P)


def _per_head(t: torch.Tensor, R: int) -> torch.Tensor:
    """[K, b, G, L, R*P] -> a [K, b, G, R, L, P] view (no copy)."""
    return t.unflatten(-1, (R, -1)).transpose(3, 4)


def _entering_states(
    blk: _Block, h_in: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States entering each chunk [K, b, G, R, P, N], the state leaving the block
    [b, G, R, P, N], and w_end * xd [K, b, G, L, R*P] (each position's share of its chunk's
    final state; the backward needs it again).

    A sequential recurrence over chunks; ``unbind`` gives all chunks in one op (slicing in the
    loop would cost one op per chunk and per tensor).
    """
    xd_end = _heads_last(blk.xd, blk.w_end)
    local = torch.matmul(xd_end.transpose(-1, -2), blk.B)  # [K, b, G, R*P, N]
    local = local.unflatten(3, blk.x.shape[3:4] + blk.x.shape[5:])  # [K, b, G, R, P, N]
    h, entering = h_in, []
    for dec, state in zip(blk.w[..., -1, None, None].unbind(0), local.unbind(0)):
        entering.append(h)
        h = torch.addcmul(state, dec, h)
    return torch.stack(entering), h, xd_end


def _read_out(blk: _Block, entering: torch.Tensor) -> torch.Tensor:
    """C_l . h_c [K, b, G, R, L, P] (a view of a [K, b, G, L, R*P] tensor): each chunk's
    entering state read at its positions."""
    h = entering.flatten(3, 4)  # [K, b, G, R*P, N]
    return _per_head(torch.matmul(blk.C, h.transpose(-1, -2)), entering.shape[3])


def _block_forward(blk: _Block, entering: torch.Tensor) -> torch.Tensor:
    """y of the block [K, b, G, R, L, P]: inside the chunks plus the entering states read out."""
    M = _decay(blk).mul_(_scores(blk))
    y = torch.matmul(M, blk.xd)
    return y.addcmul_(_read_out(blk, entering), blk.w[..., None])


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
    y = x.new_empty((b, -(-T // chunk_size) * chunk_size, H, P))  # whole chunks
    states = x.new_empty((b, -(-T // span), H, P, N), dtype=acc)
    h = x.new_zeros((b, H, P, N), dtype=acc) if initial_state is None else initial_state.to(acc)
    h = h.unflatten(1, (G, -1))  # [b, G, R, P, N]
    for k, t0 in enumerate(range(0, T, span)):
        states[:, k] = h.flatten(1, 2)
        h = _forward_block(y, x, dt, A, B, C, doc, h, t0, min(t0 + span, T), chunk_size)
    return _unpad(y, T), h.flatten(1, 2), states


def _unpad(t: torch.Tensor, T: int) -> torch.Tensor:
    """The first T positions of a buffer padded to whole chunks, contiguous."""
    return t if t.shape[1] == T else t[:, :T].contiguous()


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
    entering, h_out, _ = _entering_states(blk, h_in)
    _store(y, _block_forward(blk, entering), t0, feature=True)
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
        g_read: [K, b, G, R, P, N] gradient of each entering state through its read-out.
        g_out: [b, G, R, P, N] gradient of the state leaving the block.

    Returns:
        gradients of the states leaving each chunk [K, b, G, R, P, N], of each chunk's total
        decay w[L-1] [K, b, G, R] and of the state entering the block [b, G, R, P, N].
    """
    g, g_leave = g_out, []
    decs, reads = blk.w[..., -1, None, None].unbind(0), g_read.unbind(0)
    for c in reversed(range(len(decs))):
        g_leave.append(g)
        g = torch.addcmul(reads[c], decs[c], g)
    g_leave = torch.stack(g_leave[::-1])
    return g_leave, (g_leave * entering).sum(dim=(-2, -1)), g


def _block_backward(
    blk: _Block,
    A: torch.Tensor,
    entering: torch.Tensor,
    xd_end: torch.Tensor,
    gy: torch.Tensor,
    g_out: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of one block, chunk-major: x, dt, B, C, A [G, R] and the entering state."""
    G, R = blk.w.shape[2:4]
    h_enter = entering.flatten(3, 4)  # [K, b, G, R*P, N]
    # read-out of the entering states: y += w[l] C_l . h_c
    gy_w = _heads_last(gy, blk.w)  # [K, b, G, L, R*P]
    gC = torch.matmul(gy_w, h_enter)
    g_w = (gy * _read_out(blk, entering)).sum(dim=-1)  # [K, b, G, R, L]
    g_read = torch.matmul(gy_w.transpose(-1, -2), blk.C).view(entering.shape)
    g_leave, g_dec, g_in = _reverse_state_pass(blk, entering, g_read, g_out)
    g_w[..., -1] += g_dec
    # each chunk's own contribution to the state leaving it: sum_s w_end[s] xd_s B_s
    g_leave = g_leave.flatten(3, 4)  # [K, b, G, R*P, N]
    u = _per_head(torch.matmul(blk.B, g_leave.transpose(-1, -2)), R)  # [K, b, G, R, L, P]
    g_xd = u * blk.w_end[..., None]
    g_w_end = (blk.xd * u).sum(dim=-1)
    gB = torch.matmul(xd_end, g_leave)
    # inside the chunks: y += sum_s M[l, s] xd_s
    D = _decay(blk)
    M = D * _scores(blk)
    g_xd += torch.matmul(M.transpose(-1, -2), gy)
    dM = torch.matmul(gy, blk.xd.transpose(-1, -2))
    dS = (dM * D).sum(dim=3).mul_(blk.keep)  # [K, b, G, L, L]
    del D
    gC += torch.matmul(dS, blk.B)
    gB += torch.matmul(dS.transpose(-1, -2), blk.C)
    # log-decays a = dt * A, through D (w_end is its last row) and through w (a cumsum)
    Q = dM.mul_(M)  # dM is done with
    Q[..., -1, :] += g_w_end * blk.w_end
    gw = g_w * blk.w
    ga = _segsum_grad(Q) + gw.flip(-1).cumsum(dim=-1).flip(-1)  # [K, b, G, R, L]
    gdt = (g_xd * blk.x).sum(dim=-1) + ga * A.view(G, R, 1)
    gA = (ga * blk.dt).sum(dim=(0, 1, 4))
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
    padded = -(-T // chunk_size) * chunk_size
    grads = tuple(x.new_empty((b, padded, *t.shape[2:]), dtype=acc) for t in (x, dt, B, C))
    gA = A.new_zeros((G, H // G), dtype=acc)
    g = x.new_zeros((b, H, P, N), dtype=acc) if dfinal is None else dfinal.to(acc)
    g = g.unflatten(1, (G, -1))  # gradient of the state leaving the current block
    for k in reversed(range(states.shape[1])):
        t0, h_in = k * span, states[:, k].unflatten(1, (G, -1))
        g = _backward_block(
            grads, gA, dy, x, dt, A, B, C, doc, h_in, g, t0, min(t0 + span, T), chunk_size
        )
    gx, gdt, gB, gC = (_unpad(t, T) for t in grads)
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
    blk = _load_block(x, dt, A, B, C, doc, t0, t1, L)
    entering, _, xd_end = _entering_states(blk, h_in)
    if dy is None:
        gy = torch.zeros_like(blk.x)
    else:
        gy = _chunks(dy, t0, t1, L, (*blk.x.shape[2:4], blk.x.shape[-1]), True, gA.dtype)
    *block_grads, gA_k, g_in = _block_backward(blk, A.to(gA.dtype), entering, xd_end, gy, g_out)
    for dst, src, feature in zip(grads, block_grads, (True, False, True, True)):  # x, dt, B, C
        _store(dst, src, t0, feature)
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
    G = B.shape[2]
    parts = head_parts(x.shape[2] // G, x.device)
    if parts == 1:
        return _ssd_forward(x, dt, A, B, C, initial_state, doc, chunk_size, block_chunks)

    def part(j: int) -> tuple[torch.Tensor, ...]:
        pick = HeadSlice(G, parts, j)
        init = None if initial_state is None else pick(initial_state, 1)
        return _ssd_forward(
            pick(x, 2), pick(dt, 2), pick(A, 0), B, C, init, doc, chunk_size, block_chunks
        )

    y, final, states = zip(*run_parts(part, parts))
    return join_heads(y, G, 2), join_heads(final, G, 1), join_heads(states, G, 2)


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
    G = B.shape[2]
    parts = head_parts(x.shape[2] // G, x.device)
    if parts == 1:
        return _ssd_backward(dy, dfinal, x, dt, A, B, C, doc, states, chunk_size, block_chunks)

    def part(j: int) -> tuple[torch.Tensor, ...]:
        pick = HeadSlice(G, parts, j)
        dy_j = None if dy is None else pick(dy, 2)
        dfinal_j = None if dfinal is None else pick(dfinal, 1)
        return _ssd_backward(
            dy_j, dfinal_j, pick(x, 2), pick(dt, 2), pick(A, 0), B, C, doc, pick(states, 2),
            chunk_size, block_chunks,
        )  # fmt: skip

    gx, gdt, gA, gB, gC, g_init = zip(*run_parts(part, parts))
    heads = (join_heads(gx, G, 2), join_heads(gdt, G, 2), join_heads(gA, G, 0))
    return (*heads, sum_in_order(gB), sum_in_order(gC), join_heads(g_init, G, 1))


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
