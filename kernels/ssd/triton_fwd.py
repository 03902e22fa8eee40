"""Triton forward of the Mamba-2 SSD chunked scan: kernels, launchers and shared tile helpers.

Shape legend: b batch, T time, H heads, P head dim, G groups of B/C (head h reads group h // R,
R = H // G), N state size, L chunk length, nc chunks (ceil(T / L)). fp32 scratch tensors:

    dacs    [b, H, nc, L]     cumsum of dt * A inside each chunk (steps past T have dt = 0)
    cb      [b, nc, G, L, L]  C_t . B_s; only tiles that hold some s <= t are written
    states  [b, nc, H, P, N]  each chunk's own end state, then (in place) the state entering it
    doc     [b, nc * L]       int32 document ids, the last one repeated over the padding

The op is the one ``kernels/ssd/ref.py`` defines. Per chunk, with a_t the within-chunk cumsum of
dt * A, same(t, s) = [s <= t and t, s in one document], in(t) = [t in the document of the step
before the chunk] and end(s) = [s in the document of the chunk's last step]:

    S_c      = sum_s exp(a_end - a_s) end(s) dt_s x_s (outer) B_s             (chunk state)
    Hin_c+1  = exp(a_end) keep_c Hin_c + S_c      keep_c = [no document starts in chunk c]
    y_t      = exp(a_t) in(t) C_t . Hin_c + sum_s (C_t . B_s) exp(a_t - a_s) same(t, s) dt_s x_s

Every offset that grows with b * T (or b * nc) is formed in int64 (mamba_ssm #1015). Block sizes
are fixed per shape (no autotuning), so runs are deterministic: no atomics, fixed reduction order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.ssd.ref import document_ids

# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _mm(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with both operands rounded to DOT_DTYPE (x's dtype: bf16 tensor cores on GPU).

    Triton's interpreter multiplies bf16 dot operands as raw integers, so there the rounded
    operands are multiplied in fp32, which gives the same (exact) products.
    """
    a = a.to(DOT_DTYPE)
    b = b.to(DOT_DTYPE)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_doc(doc_row_ptr, offs, mask, HAS_DOC: tl.constexpr):
    """Document ids at chunk-local ``offs`` (``doc_row_ptr`` points at the chunk's first step)."""
    if HAS_DOC:
        return tl.load(doc_row_ptr + offs, mask=mask, other=-1)
    else:
        return offs * 0


@triton.jit
def _segment_mask(offs_t, offs_s, valid_t, valid_s, doc_t, doc_s, HAS_DOC: tl.constexpr):
    """[T_tile, S_tile] mask of s <= t inside one document, both steps real."""
    keep = (offs_s[None, :] <= offs_t[:, None]) & valid_t[:, None] & valid_s[None, :]
    if HAS_DOC:
        keep = keep & (doc_t[:, None] == doc_s[None, :])
    return keep


@triton.jit
def _rows_dot_state(
    rows, s_n, state, offs_p, valid_m, P, N,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """[BM, BP] = M[m, :N] . state[p, :N] for row pointers ``rows`` into M (n stride s_n) and a
    contiguous fp32 [P, N] ``state`` (rounded to DOT_DTYPE for the product only, as in mamba_ssm:
    an IEEE fp32 dot would be the slowest part of the scan on GPU)."""
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        m_tile = tl.load(
            rows[:, None] + offs_k[None, :] * s_n,
            mask=valid_m[:, None] & (offs_k < N)[None, :],
            other=0.0,
        )
        stT = tl.load(
            state + offs_p[None, :] * N + offs_k[:, None],
            mask=(offs_k < N)[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
        acc = _mm(m_tile, stT, acc, DOT_DTYPE, PRECISION, INTERPRET)
    return acc


@triton.jit
def _chunk_ids(pid_bc, nc, L):
    """(batch row, chunk, global time of the chunk's first step as int64) of a program."""
    bi = pid_bc // nc
    ci = pid_bc % nc
    return bi.to(tl.int64), ci, ci.to(tl.int64) * L


@triton.jit
def _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad):
    """Document of the step before the chunk (step 0 for chunk 0) and of the chunk's last step."""
    row = doc_ptr + bi * Tpad
    before = tl.load(row + tl.maximum(t0 - 1, 0))
    last = tl.load(row + t0 + L - 1)
    return before, last


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr, A_ptr, dacs_ptr,
    T, H, L, nc,
    s_dt_b, s_dt_t, s_dt_h,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """dacs[b, h, c, :] = cumsum(dt * A) over the chunk; grid (b * nc, cdiv(H, BLOCK_H))."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    valid_l = (offs_l < L) & (t0 + offs_l < T)
    dt = tl.load(
        dt_ptr + bi * s_dt_b + (t0 + offs_l)[None, :] * s_dt_t + offs_h[:, None] * s_dt_h,
        mask=(offs_h < H)[:, None] & valid_l[None, :],
        other=0.0,
    ).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
    dacs = tl.cumsum(dt * A[:, None], axis=1)
    rows = ((bi * H + offs_h) * nc + ci) * L
    tl.store(
        dacs_ptr + rows[:, None] + offs_l[None, :],
        dacs,
        mask=(offs_h < H)[:, None] & (offs_l < L)[None, :],
    )


@triton.jit
def _bmm_chunk_kernel(
    c_ptr, b_ptr, cb_ptr,
    T, L, nc, G, N,
    s_c_b, s_c_t, s_c_g, s_c_n,
    s_b_b, s_b_t, s_b_g, s_b_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """cb[b, c, g, t, s] = C_t . B_s; grid (b * nc, cdiv(L, BM) * cdiv(L, BN), G)."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    gi = tl.program_id(2)
    pid_m = tl.program_id(1) // tl.cdiv(L, BLOCK_N)
    pid_n = tl.program_id(1) % tl.cdiv(L, BLOCK_N)
    if pid_n * BLOCK_N >= (pid_m + 1) * BLOCK_M:
        return  # strictly above the diagonal: every reader masks s > t out
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    valid_n = (offs_n < L) & (t0 + offs_n < T)
    c_rows = c_ptr + bi * s_c_b + (t0 + offs_m) * s_c_t + gi * s_c_g
    b_rows = b_ptr + bi * s_b_b + (t0 + offs_n) * s_b_t + gi * s_b_g
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c_tile = tl.load(
            c_rows[:, None] + offs_k[None, :] * s_c_n,
            mask=valid_m[:, None] & (offs_k < N)[None, :],
            other=0.0,
        )
        bT_tile = tl.load(
            b_rows[None, :] + offs_k[:, None] * s_b_n,
            mask=(offs_k < N)[:, None] & valid_n[None, :],
            other=0.0,
        )
        acc = _mm(c_tile, bT_tile, acc, DOT_DTYPE, PRECISION, INTERPRET)
    out = cb_ptr + ((bi * nc + ci) * G + gi) * L * L
    tl.store(
        out + offs_m[:, None] * L + offs_n[None, :],
        acc,
        mask=(offs_m < L)[:, None] & (offs_n < L)[None, :],
    )


@triton.jit
def _chunk_state_kernel(
    x_ptr, b_ptr, dt_ptr, dacs_ptr, doc_ptr, out_ptr,
    T, L, nc, H, R, P, N, Tpad,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_b_b, s_b_t, s_b_g, s_b_n,
    s_dt_b, s_dt_t, s_dt_h,
    FROM_START: tl.constexpr, HAS_DOC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """out[b, c, h] = sum_s w_s x_s (outer) B_s over one chunk; grid (b*nc, P x N tiles, H).

    FROM_START False (forward chunk state): w_s = exp(a_end - a_s) dt_s end(s).
    FROM_START True (backward, with x := dy and B := C): w_s = exp(a_s) in(s), which gives
    dL/dHin_c accumulated through the chunk's own outputs.
    """
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    hi = tl.program_id(2)
    gi = hi // R
    pid_p = tl.program_id(1) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(1) % tl.cdiv(N, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dacs_row = dacs_ptr + ((bi * H + hi) * nc + ci) * L
    a_end = tl.load(dacs_row + L - 1)
    if HAS_DOC:
        doc_before, doc_last = _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad)
    x_chunk = x_ptr + bi * s_x_b + t0 * s_x_t + hi * s_x_h
    b_chunk = b_ptr + bi * s_b_b + t0 * s_b_t + gi * s_b_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, L, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid_s = (offs_s < L) & (t0 + offs_s < T)
        a_s = tl.load(dacs_row + offs_s, mask=offs_s < L, other=0.0)
        doc_s = _load_doc(doc_ptr + bi * Tpad + t0, offs_s, offs_s < L, HAS_DOC)
        if FROM_START:
            w = tl.exp(a_s)
            if HAS_DOC:
                w = tl.where(doc_s == doc_before, w, 0.0)
        else:
            dt_s = tl.load(
                dt_ptr + bi * s_dt_b + (t0 + offs_s) * s_dt_t + hi * s_dt_h, mask=valid_s, other=0.0
            ).to(tl.float32)
            w = tl.exp(a_end - a_s) * dt_s
            if HAS_DOC:
                w = tl.where(doc_s == doc_last, w, 0.0)
        w = tl.where(valid_s, w, 0.0)
        xT = tl.load(
            x_chunk + offs_s[None, :] * s_x_t + offs_p[:, None] * s_x_p,
            mask=(offs_p < P)[:, None] & valid_s[None, :],
            other=0.0,
        )
        b_tile = tl.load(
            b_chunk + offs_s[:, None] * s_b_t + offs_n[None, :] * s_b_n,
            mask=valid_s[:, None] & (offs_n < N)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = _mm(xT, b_tile * w[:, None], acc, DOT_DTYPE, PRECISION, INTERPRET)
    out = out_ptr + ((bi * nc + ci) * H + hi) * P * N
    tl.store(
        out + offs_p[:, None] * N + offs_n[None, :],
        acc,
        mask=(offs_p < P)[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, init_ptr, final_ptr, dacs_ptr, doc_ptr,
    L, nc, H, PN, N, Tpad,
    s_i_b, s_i_h, s_i_p, s_i_n,
    HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Sequential over chunks: states[c] := state entering chunk c; grid (cdiv(P*N, BLOCK), b, H).

    Hin_0 = initial state (or 0); Hin_c+1 = exp(a_end) keep_c Hin_c + S_c; final = Hin_nc.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2)
    mask = offs < PN
    if HAS_INIT:
        h = tl.load(
            init_ptr + bi * s_i_b + hi * s_i_h + (offs // N) * s_i_p + (offs % N) * s_i_n,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    else:
        h = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DOC:
        doc_prev = tl.load(doc_ptr + bi * Tpad)  # the initial state belongs to step 0's document
    for ci in range(nc):
        slot = states_ptr + ((bi * nc + ci) * H + hi) * PN + offs
        s_c = tl.load(slot, mask=mask, other=0.0)
        tl.store(slot, h, mask=mask)
        scale = tl.exp(tl.load(dacs_ptr + ((bi * H + hi) * nc + ci) * L + L - 1))
        if HAS_DOC:
            doc_last = tl.load(doc_ptr + bi * Tpad + ci * L + L - 1)  # ci * L < T fits int32
            scale = tl.where(doc_last == doc_prev, scale, 0.0)
            doc_prev = doc_last
        h = scale * h + s_c
    tl.store(final_ptr + (bi * H + hi) * PN + offs, h, mask=mask)


@triton.jit
def _intra_chunk_y(
    acc, cb, x_chunk, dt_chunk, dacs_row, doc_row, a_m, doc_m, offs_m, offs_p, valid_m,
    s_end, T_left, L, P, s_x_t, s_x_p, s_dt_t,
    HAS_DOC: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """acc + sum_{s <= t} (C_t . B_s) exp(a_t - a_s) same(t, s) dt_s x_s for rows ``offs_m``.

    Pointers are at the chunk's first step (and the head); s runs over [0, s_end); T_left = T -
    the chunk's first step.
    """
    for s0 in range(0, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid_s = (offs_s < L) & (offs_s < T_left)
        doc_s = _load_doc(doc_row, offs_s, offs_s < L, HAS_DOC)
        keep = _segment_mask(offs_m, offs_s, valid_m, valid_s, doc_m, doc_s, HAS_DOC)
        cb_tile = tl.load(cb + offs_m[:, None] * L + offs_s[None, :], mask=keep, other=0.0)
        a_s = tl.load(dacs_row + offs_s, mask=offs_s < L, other=0.0)
        dt_s = tl.load(dt_chunk + offs_s * s_dt_t, mask=valid_s, other=0.0).to(tl.float32)
        decay = tl.exp(tl.where(keep, a_m[:, None] - a_s[None, :], float("-inf")))
        x_tile = tl.load(
            x_chunk + offs_s[:, None] * s_x_t + offs_p[None, :] * s_x_p,
            mask=valid_s[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
        acc = _mm(cb_tile * decay * dt_s[None, :], x_tile, acc, DOT_DTYPE, PRECISION, INTERPRET)
    return acc


@triton.jit
def _chunk_scan_fwd_kernel(
    cb_ptr, x_ptr, dt_ptr, dacs_ptr, c_ptr, states_ptr, doc_ptr, y_ptr, dy_ptr, rowdot_ptr,
    T, L, nc, H, R, G, P, N, Tpad,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_c_b, s_c_t, s_c_g, s_c_n,
    s_dt_b, s_dt_t, s_dt_h,
    s_y_b, s_y_t, s_y_h, s_y_p,
    s_dy_b, s_dy_t, s_dy_h, s_dy_p,
    HAS_DOC: tl.constexpr, ROWDOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """y = entering-state part + intra-chunk part; grid (b * nc, cdiv(L, BM) * cdiv(P, BP), H).

    ROWDOT (backward recompute): instead of y, store rowdot[b, h, t] = sum_p dy_t y_state_t, with
    y_state the entering-state part in fp32; needs BLOCK_P >= P.
    """
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    hi = tl.program_id(2)
    gi = hi // R
    pid_m = tl.program_id(1) // tl.cdiv(P, BLOCK_P)
    pid_p = tl.program_id(1) % tl.cdiv(P, BLOCK_P)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    dacs_row = dacs_ptr + ((bi * H + hi) * nc + ci) * L
    a_m = tl.load(dacs_row + offs_m, mask=offs_m < L, other=0.0)
    doc_m = _load_doc(doc_ptr + bi * Tpad + t0, offs_m, offs_m < L, HAS_DOC)

    # the state entering the chunk, read by C_t and decayed from the chunk start to t
    acc = _rows_dot_state(
        c_ptr + bi * s_c_b + (t0 + offs_m) * s_c_t + gi * s_c_g, s_c_n,
        states_ptr + ((bi * nc + ci) * H + hi) * P * N, offs_p, valid_m, P, N,
        BLOCK_M, BLOCK_P, BLOCK_K, DOT_DTYPE, PRECISION, INTERPRET,
    )  # fmt: skip
    w_in = tl.exp(a_m)
    if HAS_DOC:
        doc_before, doc_last = _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad)
        w_in = tl.where(doc_m == doc_before, w_in, 0.0)
    acc = acc * tl.where(valid_m, w_in, 0.0)[:, None]

    if not ROWDOT:  # the backward takes the intra-chunk share of dL/da from dcb's Q tiles
        acc = _intra_chunk_y(
            acc, cb_ptr + ((bi * nc + ci) * G + gi) * L * L,
            x_ptr + bi * s_x_b + t0 * s_x_t + hi * s_x_h,
            dt_ptr + bi * s_dt_b + t0 * s_dt_t + hi * s_dt_h,
            dacs_row, doc_ptr + bi * Tpad + t0, a_m, doc_m, offs_m, offs_p, valid_m,
            tl.minimum((pid_m + 1) * BLOCK_M, L), T - t0, L, P, s_x_t, s_x_p, s_dt_t,
            HAS_DOC, BLOCK_S, DOT_DTYPE, PRECISION, INTERPRET,
        )  # fmt: skip

    out_mask = valid_m[:, None] & (offs_p < P)[None, :]
    if ROWDOT:
        dy_rows = dy_ptr + bi * s_dy_b + (t0 + offs_m) * s_dy_t + hi * s_dy_h
        dy = tl.load(
            dy_rows[:, None] + offs_p[None, :] * s_dy_p,
            mask=out_mask,
            other=0.0,
        ).to(tl.float32)
        rowdot = tl.sum(tl.where(out_mask, acc * dy, 0.0), axis=1)
        tl.store(rowdot_ptr + (bi * H + hi) * Tpad + t0 + offs_m, rowdot, mask=valid_m)
    else:
        y = y_ptr + bi * s_y_b + (t0 + offs_m)[:, None] * s_y_t + hi * s_y_h
        tl.store(y + offs_p[None, :] * s_y_p, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- launchers

_POISON = False


@contextlib.contextmanager
def nan_poisoned_buffers() -> Iterator[None]:
    """Fill every output and scratch buffer the launchers allocate with NaN (integers: -1).

    For tests: an element that no kernel writes then shows up as NaN instead of a plausible zero.
    """
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer (NaN-filled inside ``nan_poisoned_buffers``)."""
    if _POISON:
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


INTERPRET = type(_chunk_cumsum_kernel).__name__ == "InterpretedFunction"
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class Geometry(NamedTuple):
    """Sizes of one scan (see the shape legend)."""

    b: int
    T: int
    H: int
    P: int
    G: int
    N: int
    L: int
    nc: int

    @property
    def R(self) -> int:
        return self.H // self.G

    @property
    def Tpad(self) -> int:
        return self.nc * self.L


def geometry(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> Geometry:
    """Sizes from x [b, T, H, P] and B [b, T, G, N]."""
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    return Geometry(b, T, H, P, G, N, chunk_size, triton.cdiv(T, chunk_size))


TILE_CAP = 64  # largest tile edge; tests lower it to reach the multi-tile code paths


def tile_cap() -> int:
    return TILE_CAP


def block(n: int, cap: int | None = None) -> int:
    """A power-of-two tile edge >= n up to ``cap`` (default TILE_CAP), at least 16 (tl.dot)."""
    return max(16, min(TILE_CAP if cap is None else cap, triton.next_power_of_2(n)))


def dot_args(x: torch.Tensor) -> dict:
    """Operand dtype of every matmul (x's) and fp32 precision (IEEE: correctness first)."""
    dot_dtype = _DOT_DTYPES[x.dtype]
    return {
        "DOT_DTYPE": dot_dtype,
        "PRECISION": "ieee" if dot_dtype == tl.float32 else "tf32",
        "INTERPRET": INTERPRET,
    }


def device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU; the CPU path (interpreter only) must not touch torch.cuda."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    if not INTERPRET:
        raise RuntimeError(
            "the Triton SSD kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels.ssd.triton is first imported (CPU tests)"
        )
    return contextlib.nullcontext()


def prepare_documents(seq_idx: torch.Tensor | None, geo: Geometry) -> torch.Tensor | None:
    """[b, nc * L] int32 document ids (0, 1, ... per row), the last repeated over the padding."""
    if seq_idx is None:
        return None
    doc = document_ids(seq_idx)
    pad = geo.Tpad - geo.T
    if pad:
        doc = torch.cat([doc, doc[:, -1:].expand(-1, pad)], dim=1)
    return doc.to(torch.int32).contiguous()


def chunk_cumsum(dt: torch.Tensor, A: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """dacs [b, H, nc, L] fp32: cumsum of dt * A inside each chunk."""
    dacs = new_buffer((geo.b, geo.H, geo.nc, geo.L), torch.float32, dt.device)
    block_l = triton.next_power_of_2(geo.L)
    block_h = max(1, min(triton.next_power_of_2(geo.H), 4096 // block_l))
    grid = (geo.b * geo.nc, triton.cdiv(geo.H, block_h))
    _chunk_cumsum_kernel[grid](
        dt, A, dacs, geo.T, geo.H, geo.L, geo.nc, *dt.stride(),
        BLOCK_H=block_h, BLOCK_L=block_l,
    )  # fmt: skip
    return dacs


def bmm_chunk(C: torch.Tensor, B: torch.Tensor, geo: Geometry, dots: dict) -> torch.Tensor:
    """cb [b, nc, G, L, L] fp32 = C_t . B_s per chunk (lower-triangular tiles only)."""
    cb = new_buffer((geo.b, geo.nc, geo.G, geo.L, geo.L), torch.float32, C.device)
    bm = block(geo.L)
    grid = (geo.b * geo.nc, triton.cdiv(geo.L, bm) ** 2, geo.G)
    _bmm_chunk_kernel[grid](
        C, B, cb, geo.T, geo.L, geo.nc, geo.G, geo.N, *C.stride(), *B.stride(),
        BLOCK_M=bm, BLOCK_N=bm, BLOCK_K=block(geo.N), **dots,
    )  # fmt: skip
    return cb


def chunk_state(
    x: torch.Tensor,
    B: torch.Tensor,
    dt: torch.Tensor,
    dacs: torch.Tensor,
    doc: torch.Tensor | None,
    geo: Geometry,
    dots: dict,
    from_start: bool = False,
) -> torch.Tensor:
    """[b, nc, H, P, N] fp32: each chunk's own end state (or, from_start, the dy.C reduction)."""
    out = new_buffer((geo.b, geo.nc, geo.H, geo.P, geo.N), torch.float32, x.device)
    bp, bn = block(geo.P), block(geo.N)
    grid = (geo.b * geo.nc, triton.cdiv(geo.P, bp) * triton.cdiv(geo.N, bn), geo.H)
    _chunk_state_kernel[grid](
        x, B, dt, dacs, dacs if doc is None else doc, out,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.P, geo.N, geo.Tpad,
        *x.stride(), *B.stride(), *dt.stride(),
        FROM_START=from_start, HAS_DOC=doc is not None,
        BLOCK_P=bp, BLOCK_N=bn, BLOCK_S=block(geo.L), **dots,
    )  # fmt: skip
    return out


def state_passing(
    states: torch.Tensor,
    dacs: torch.Tensor,
    doc: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    geo: Geometry,
) -> torch.Tensor:
    """Turn ``states`` into the states entering each chunk, in place; returns final [b,H,P,N]."""
    final = new_buffer((geo.b, geo.H, geo.P, geo.N), torch.float32, states.device)
    pn = geo.P * geo.N
    blk = min(triton.next_power_of_2(pn), 16 * tile_cap())
    init = states if initial_state is None else initial_state
    init_strides = (0, 0, 0, 0) if initial_state is None else initial_state.stride()
    _state_passing_fwd_kernel[(triton.cdiv(pn, blk), geo.b, geo.H)](
        states, init, final, dacs, dacs if doc is None else doc,
        geo.L, geo.nc, geo.H, pn, geo.N, geo.Tpad, *init_strides,
        HAS_INIT=initial_state is not None, HAS_DOC=doc is not None, BLOCK=blk,
    )  # fmt: skip
    return final


def chunk_scan(
    cb: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    dacs: torch.Tensor,
    C: torch.Tensor,
    states: torch.Tensor,
    doc: torch.Tensor | None,
    geo: Geometry,
    dots: dict,
    dy: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [b, T, H, P] in x's dtype; with ``dy``: rowdot [b, H, nc * L] = sum_p dy * y_state."""
    rowdot = dy is not None
    if rowdot:
        if geo.P > 256:
            raise ValueError(f"the Triton SSD backward supports head_dim <= 256, got {geo.P}")
        out = new_buffer((geo.b, geo.H, geo.Tpad), torch.float32, x.device)
        y, dy_ = x, dy
    else:
        out = new_buffer(tuple(x.shape), x.dtype, x.device)
        y, dy_ = out, x
    bm = block(geo.L)
    bp = block(geo.P, 256) if rowdot else block(geo.P)
    grid = (geo.b * geo.nc, triton.cdiv(geo.L, bm) * triton.cdiv(geo.P, bp), geo.H)
    _chunk_scan_fwd_kernel[grid](
        cb, x, dt, dacs, C, states, dacs if doc is None else doc, y, dy_, out,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.G, geo.P, geo.N, geo.Tpad,
        *x.stride(), *C.stride(), *dt.stride(), *y.stride(), *dy_.stride(),
        HAS_DOC=doc is not None, ROWDOT=rowdot,
        BLOCK_M=bm, BLOCK_P=bp, BLOCK_K=block(geo.N), BLOCK_S=bm, **dots,
    )  # fmt: skip
    return out


class ForwardParts(NamedTuple):
    """What the forward computes and the backward recomputes."""

    geo: Geometry
    dots: dict
    doc: torch.Tensor | None  # [b, nc * L] int32
    dacs: torch.Tensor  # [b, H, nc, L]
    cb: torch.Tensor  # [b, nc, G, L, L]
    states: torch.Tensor  # [b, nc, H, P, N], the state entering each chunk
    final_state: torch.Tensor  # [b, H, P, N]


def forward_parts(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> ForwardParts:
    """Everything but the output projection y: cumsum -> CB -> chunk states -> state passing."""
    geo = geometry(x, B, chunk_size)
    dots = dot_args(x)
    doc = prepare_documents(seq_idx, geo)
    dacs = chunk_cumsum(dt, A, geo)
    cb = bmm_chunk(C, B, geo, dots)
    states = chunk_state(x, B, dt, dacs, doc, geo, dots)
    final_state = state_passing(states, dacs, doc, initial_state, geo)
    return ForwardParts(geo, dots, doc, dacs, cb, states, final_state)


def ssd_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward scan (no autograd): y [b, T, H, P] in x's dtype, final_state [b, H, P, N] fp32.

    Inputs as in ``kernels.ssd.ref.ssd_scan_chunked`` (already checked by the caller).
    """
    with device_guard(x):
        parts = forward_parts(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
        y = chunk_scan(
            parts.cb, x, dt, parts.dacs, C, parts.states, parts.doc, parts.geo, parts.dots
        )
    return y, parts.final_state
