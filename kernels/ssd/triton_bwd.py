"""Triton backward of the Mamba-2 SSD chunked scan: kernels and launchers.

Shape legend and per-chunk notation as in ``kernels/ssd/triton_fwd.py`` (a_t: within-chunk cumsum
of dt * A; u_s = dt_s x_s; same/in/end: the document masks; Hin_c: state entering chunk c).

The forward pieces (cumsum, CB, chunk states, state passing) are recomputed, not saved. Then,
with dy [b, T, H, P] and dfinal [b, H, P, N]:

1. ``chunk_state(from_start=True)``: Dy_c = sum_t exp(a_t) in(t) dy_t (outer) C_t.
2. ``_state_passing_bwd_kernel``, backwards over chunks: dS_c = g_c+1 (gradient of the state
   leaving chunk c, g_nc = dfinal), g_c = exp(a_end) keep_c g_c+1 + Dy_c, d(initial) = g_0, and
   the decay's share dL/da_end += exp(a_end) keep_c <g_c+1, Hin_c>.
3. ``_chunk_scan_bwd_dx_kernel``: du_s = sum_{t >= s} (C_t . B_s) exp(a_t - a_s) same(t, s) dy_t
   + exp(a_end - a_s) end(s) dS_c B_s; dx = dt du; sum_p x du; R_s = sum_p u_s du_state_s.
4. ``_chunk_scan_bwd_dcb_kernel``: per head dCB_ts = exp(a_t - a_s) same(t, s) dt_s dy_t . x_s
   (summed over the group's heads into dcb) and Q_ts = dCB_ts (C_t . B_s), the intra-chunk terms
   of dL/da; then ``_chunk_scan_bwd_dc_kernel`` / ``_chunk_scan_bwd_db_kernel``:
   dC_t = sum_h exp(a_t) in(t) Hin_c^T dy_t + sum_s dcb_ts B_s,
   dB_s = sum_h exp(a_end - a_s) end(s) dt_s dS_c^T x_s + sum_t dcb_ts C_t.
5. dL/da. Each a_t enters as +a_t where step t reads (y_t) and as -a_s where step s is read, so
   dL/da_t = sum_p dy_t y_state_t + sum_s Q_ts - sum_t' Q_t't - R_t
   (+ sum_s R_s + the state-passing share at t = L - 1, where a_end lives). The y_state term
   comes from ``chunk_scan(dy=...)``; the Q sums from the Q tiles themselves, so that the
   intra-chunk +/- pairs cancel exactly (the same sums taken from y and du would carry two
   different bf16 roundings, which left dA with ~10% errors). ``_ddt_combine_kernel`` then forms
   d(dt A)_k = sum_{t >= k} dL/da_t, ddt = sum_p x du + A d(dt A), and per-chunk partial sums of
   dA = sum d(dt A) dt.

All of it is Triton; only the last sums over blocks / chunks (tiny [.., H] tensors) are torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.ssd.triton_fwd import (
    Geometry,
    _chunk_edge_docs,
    _chunk_ids,
    _load_doc,
    _mm,
    _rows_dot_state,
    _segment_mask,
    block,
    chunk_scan,
    chunk_state,
    device_guard,
    forward_parts,
    new_buffer,
    tile_cap,
)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr, states_ptr, dfinal_ptr, dinit_ptr, dacs_ptr, doc_ptr, ddacs_end_ptr,
    b, L, nc, H, PN, Tpad,
    s_f_b, s_f_h, s_f_pn,
    HAS_DFINAL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Backwards over chunks; dstates[c]: Dy_c in, dS_c out (in place); grid (PN tiles, b, H).

    ddacs_end [n_tiles, b, H, nc] gets this tile's share of exp(a_end) keep_c <g_c+1, Hin_c>.
    """
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    bi = tl.program_id(1).to(tl.int64)
    hi = tl.program_id(2)
    mask = offs < PN
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + bi * s_f_b + hi * s_f_h + offs * s_f_pn, mask=mask, other=0.0).to(
            tl.float32
        )
    else:
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nc):
        ci = nc - 1 - i
        slot = ((bi * nc + ci) * H + hi) * PN + offs
        dy_c = tl.load(dstates_ptr + slot, mask=mask, other=0.0)
        tl.store(dstates_ptr + slot, g, mask=mask)
        h_in = tl.load(states_ptr + slot, mask=mask, other=0.0)
        scale = tl.exp(tl.load(dacs_ptr + ((bi * H + hi) * nc + ci) * L + L - 1))
        if HAS_DOC:
            doc_before = tl.load(doc_ptr + bi * Tpad + tl.maximum(ci * L - 1, 0))
            doc_last = tl.load(doc_ptr + bi * Tpad + ci * L + L - 1)
            scale = tl.where(doc_last == doc_before, scale, 0.0)
        share = scale * tl.sum(tl.where(mask, g * h_in, 0.0), axis=0)
        tl.store(ddacs_end_ptr + ((pid * b + bi) * H + hi) * nc + ci, share)
        g = scale * g + dy_c
    tl.store(dinit_ptr + (bi * H + hi) * PN + offs, g, mask=mask)


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    cb_ptr, dy_ptr, x_ptr, dt_ptr, dacs_ptr, b_ptr, dstates_ptr, doc_ptr,
    dx_ptr, ddt_x_ptr, r_state_ptr,
    T, L, nc, H, R, G, P, N, Tpad,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dy_b, s_dy_t, s_dy_h, s_dy_p,
    s_b_b, s_b_t, s_b_g, s_b_n,
    s_dt_b, s_dt_t, s_dt_h,
    s_dx_b, s_dx_t, s_dx_h, s_dx_p,
    HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dx, sum_p x du and sum_p u du_state for BLOCK_M steps s, all of P; grid (b*nc, s tiles, H)."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    hi = tl.program_id(2)
    gi = hi // R
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    dacs_row = dacs_ptr + ((bi * H + hi) * nc + ci) * L
    a_m = tl.load(dacs_row + offs_m, mask=offs_m < L, other=0.0)
    a_end = tl.load(dacs_row + L - 1)
    doc_m = _load_doc(doc_ptr + bi * Tpad + t0, offs_m, offs_m < L, HAS_DOC)

    # through the chunk's end state: exp(a_end - a_s) end(s) B_s . dS_c
    acc = _rows_dot_state(
        b_ptr + bi * s_b_b + (t0 + offs_m) * s_b_t + gi * s_b_g, s_b_n,
        dstates_ptr + ((bi * nc + ci) * H + hi) * P * N, offs_p, valid_m, P, N,
        BLOCK_M, BLOCK_P, BLOCK_K, DOT_DTYPE, PRECISION, INTERPRET,
    )  # fmt: skip
    w_end = tl.exp(a_end - a_m)
    if HAS_DOC:
        doc_before, doc_last = _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad)
        w_end = tl.where(doc_m == doc_last, w_end, 0.0)
    du_state = acc * tl.where(valid_m, w_end, 0.0)[:, None]

    # through later outputs of the chunk: sum_t CB_ts exp(a_t - a_s) same(t, s) dy_t
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    cb = cb_ptr + ((bi * nc + ci) * G + gi) * L * L
    dy_chunk = dy_ptr + bi * s_dy_b + t0 * s_dy_t + hi * s_dy_h
    for u0 in range(tl.program_id(1) * BLOCK_M, L, BLOCK_T):
        offs_t = u0 + tl.arange(0, BLOCK_T)
        valid_t = (offs_t < L) & (t0 + offs_t < T)
        doc_t = _load_doc(doc_ptr + bi * Tpad + t0, offs_t, offs_t < L, HAS_DOC)
        keepT = (offs_m[:, None] <= offs_t[None, :]) & valid_m[:, None] & valid_t[None, :]
        if HAS_DOC:
            keepT = keepT & (doc_m[:, None] == doc_t[None, :])
        cbT = tl.load(cb + offs_t[None, :] * L + offs_m[:, None], mask=keepT, other=0.0)
        a_t = tl.load(dacs_row + offs_t, mask=offs_t < L, other=0.0)
        decayT = tl.exp(tl.where(keepT, a_t[None, :] - a_m[:, None], float("-inf")))
        dy_tile = tl.load(
            dy_chunk + offs_t[:, None] * s_dy_t + offs_p[None, :] * s_dy_p,
            mask=valid_t[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
        acc = _mm(cbT * decayT, dy_tile, acc, DOT_DTYPE, PRECISION, INTERPRET)
    du = acc + du_state

    mask = valid_m[:, None] & (offs_p < P)[None, :]
    x_tile = tl.load(
        x_ptr + bi * s_x_b + (t0 + offs_m)[:, None] * s_x_t + hi * s_x_h + offs_p[None, :] * s_x_p,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    dt_m = tl.load(
        dt_ptr + bi * s_dt_b + (t0 + offs_m) * s_dt_t + hi * s_dt_h, mask=valid_m, other=0.0
    ).to(tl.float32)
    dx = dx_ptr + bi * s_dx_b + (t0 + offs_m)[:, None] * s_dx_t + hi * s_dx_h
    tl.store(
        dx + offs_p[None, :] * s_dx_p, (du * dt_m[:, None]).to(dx_ptr.dtype.element_ty), mask=mask
    )
    row = (bi * H + hi) * Tpad + t0 + offs_m
    tl.store(ddt_x_ptr + row, tl.sum(x_tile * du, axis=1), mask=valid_m)
    tl.store(r_state_ptr + row, dt_m * tl.sum(x_tile * du_state, axis=1), mask=valid_m)


@triton.jit
def _chunk_scan_bwd_dcb_kernel(
    dy_ptr, x_ptr, dt_ptr, dacs_ptr, doc_ptr, cb_ptr, dcb_ptr, rowq_ptr, colq_ptr,
    T, L, nc, H, R, G, P, Tpad, s_q,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dy_b, s_dy_t, s_dy_h, s_dy_p,
    s_dt_b, s_dt_t, s_dt_h,
    HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dcb[b, c, g, t, s] = sum over the group's heads h of dcb_h = exp(a_t - a_s) same dt_s dy_t.x_s.

    Per head also Q_ts = dcb_h * cb_ts, the intra-chunk terms of dL/da (+a_t, -a_s); their row
    sums go to rowq[s tile, b, h, t] and column sums to colq[t tile, b, h, s], both computed from
    the same Q so that they cancel exactly where they should. Grid (b * nc, L tiles ** 2, G);
    tiles strictly above the diagonal are skipped.
    """
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    gi = tl.program_id(2)
    pid_m = tl.program_id(1) // tl.cdiv(L, BLOCK_N)
    pid_n = tl.program_id(1) % tl.cdiv(L, BLOCK_N)
    if pid_n * BLOCK_N >= (pid_m + 1) * BLOCK_M:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    valid_n = (offs_n < L) & (t0 + offs_n < T)
    doc_m = _load_doc(doc_ptr + bi * Tpad + t0, offs_m, offs_m < L, HAS_DOC)
    doc_n = _load_doc(doc_ptr + bi * Tpad + t0, offs_n, offs_n < L, HAS_DOC)
    keep = _segment_mask(offs_m, offs_n, valid_m, valid_n, doc_m, doc_n, HAS_DOC)
    cb_tile = tl.load(
        cb_ptr + ((bi * nc + ci) * G + gi) * L * L + offs_m[:, None] * L + offs_n[None, :],
        mask=keep,
        other=0.0,
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        hi = gi * R + r
        dyx = _dy_dot_x(
            dy_ptr + bi * s_dy_b + t0 * s_dy_t + hi * s_dy_h,
            x_ptr + bi * s_x_b + t0 * s_x_t + hi * s_x_h,
            offs_m, offs_n, valid_m, valid_n, P, s_dy_t, s_dy_p, s_x_t, s_x_p,
            BLOCK_M, BLOCK_N, BLOCK_P, DOT_DTYPE, PRECISION, INTERPRET,
        )  # fmt: skip
        dacs_row = dacs_ptr + ((bi * H + hi) * nc + ci) * L
        a_m = tl.load(dacs_row + offs_m, mask=offs_m < L, other=0.0)
        a_n = tl.load(dacs_row + offs_n, mask=offs_n < L, other=0.0)
        dt_n = tl.load(
            dt_ptr + bi * s_dt_b + (t0 + offs_n) * s_dt_t + hi * s_dt_h, mask=valid_n, other=0.0
        ).to(tl.float32)
        decay = tl.exp(tl.where(keep, a_m[:, None] - a_n[None, :], float("-inf")))
        dcb_h = dyx * decay * dt_n[None, :]
        acc += dcb_h
        q = dcb_h * cb_tile
        row = (bi * H + hi) * Tpad + t0
        rowq = rowq_ptr + pid_n.to(tl.int64) * s_q + row
        tl.store(rowq + offs_m, tl.sum(q, axis=1), mask=valid_m)
        colq = colq_ptr + pid_m.to(tl.int64) * s_q + row
        tl.store(colq + offs_n, tl.sum(q, axis=0), mask=valid_n)
    out = dcb_ptr + ((bi * nc + ci) * G + gi) * L * L
    tl.store(
        out + offs_m[:, None] * L + offs_n[None, :],
        acc,
        mask=(offs_m < L)[:, None] & (offs_n < L)[None, :],
    )


@triton.jit
def _dy_dot_x(
    dy_chunk, x_chunk, offs_m, offs_n, valid_m, valid_n, P, s_dy_t, s_dy_p, s_x_t, s_x_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """[BM, BN] dy_t . x_s over P for one head (pointers at the chunk's first step)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        dy_tile = tl.load(
            dy_chunk + offs_m[:, None] * s_dy_t + offs_p[None, :] * s_dy_p,
            mask=valid_m[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
        xT = tl.load(
            x_chunk + offs_n[None, :] * s_x_t + offs_p[:, None] * s_x_p,
            mask=(offs_p < P)[:, None] & valid_n[None, :],
            other=0.0,
        )
        acc = _mm(dy_tile, xT, acc, DOT_DTYPE, PRECISION, INTERPRET)
    return acc


@triton.jit
def _chunk_scan_bwd_dc_kernel(
    dy_ptr, states_ptr, dcb_ptr, b_ptr, dacs_ptr, doc_ptr, dc_ptr,
    T, L, nc, H, R, G, P, N, Tpad,
    s_dy_b, s_dy_t, s_dy_h, s_dy_p,
    s_b_b, s_b_t, s_b_g, s_b_n,
    s_c_b, s_c_t, s_c_g, s_c_n,
    HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dC_t = sum_h exp(a_t) in(t) Hin^T dy_t + sum_s dcb_ts B_s; grid (b*nc, t x n tiles, G)."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    gi = tl.program_id(2)
    pid_m = tl.program_id(1) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(1) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    doc_m = _load_doc(doc_ptr + bi * Tpad + t0, offs_m, offs_m < L, HAS_DOC)
    in_m = valid_m
    if HAS_DOC:
        doc_before, doc_last = _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad)
        in_m = in_m & (doc_m == doc_before)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        hi = gi * R + r
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        state = states_ptr + ((bi * nc + ci) * H + hi) * P * N
        dy_rows = dy_ptr + bi * s_dy_b + (t0 + offs_m) * s_dy_t + hi * s_dy_h
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            dy_tile = tl.load(
                dy_rows[:, None] + offs_p[None, :] * s_dy_p,
                mask=valid_m[:, None] & (offs_p < P)[None, :],
                other=0.0,
            )
            st = tl.load(
                state + offs_p[:, None] * N + offs_n[None, :],
                mask=(offs_p < P)[:, None] & (offs_n < N)[None, :],
                other=0.0,
            )
            acc_h = _mm(dy_tile, st, acc_h, DOT_DTYPE, PRECISION, INTERPRET)
        a_m = tl.load(dacs_ptr + ((bi * H + hi) * nc + ci) * L + offs_m, mask=offs_m < L, other=0.0)
        acc += acc_h * tl.where(in_m, tl.exp(a_m), 0.0)[:, None]
    dcb = dcb_ptr + ((bi * nc + ci) * G + gi) * L * L
    b_chunk = b_ptr + bi * s_b_b + t0 * s_b_t + gi * s_b_g
    for s0 in range(0, tl.minimum((pid_m + 1) * BLOCK_M, L), BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid_s = (offs_s < L) & (t0 + offs_s < T)
        causal = (offs_s[None, :] <= offs_m[:, None]) & valid_m[:, None] & valid_s[None, :]
        dcb_tile = tl.load(dcb + offs_m[:, None] * L + offs_s[None, :], mask=causal, other=0.0)
        b_tile = tl.load(
            b_chunk + offs_s[:, None] * s_b_t + offs_n[None, :] * s_b_n,
            mask=valid_s[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        acc = _mm(dcb_tile, b_tile, acc, DOT_DTYPE, PRECISION, INTERPRET)
    dc = dc_ptr + bi * s_c_b + (t0 + offs_m)[:, None] * s_c_t + gi * s_c_g
    tl.store(
        dc + offs_n[None, :] * s_c_n,
        acc.to(dc_ptr.dtype.element_ty),
        mask=valid_m[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _chunk_scan_bwd_db_kernel(
    x_ptr, dstates_ptr, dcb_ptr, c_ptr, dt_ptr, dacs_ptr, doc_ptr, db_ptr,
    T, L, nc, H, R, G, P, N, Tpad,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_c_b, s_c_t, s_c_g, s_c_n,
    s_dt_b, s_dt_t, s_dt_h,
    s_b_b, s_b_t, s_b_g, s_b_n,
    HAS_DOC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dB_s = sum_h exp(a_end - a_s) end(s) dt_s dS^T x_s + sum_t dcb_ts C_t; grid like dC."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    gi = tl.program_id(2)
    pid_m = tl.program_id(1) // tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(1) % tl.cdiv(N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = (offs_m < L) & (t0 + offs_m < T)
    doc_m = _load_doc(doc_ptr + bi * Tpad + t0, offs_m, offs_m < L, HAS_DOC)
    end_m = valid_m
    if HAS_DOC:
        doc_before, doc_last = _chunk_edge_docs(doc_ptr, bi, ci, t0, L, Tpad)
        end_m = end_m & (doc_m == doc_last)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        hi = gi * R + r
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dstate = dstates_ptr + ((bi * nc + ci) * H + hi) * P * N
        x_rows = x_ptr + bi * s_x_b + (t0 + offs_m) * s_x_t + hi * s_x_h
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            x_tile = tl.load(
                x_rows[:, None] + offs_p[None, :] * s_x_p,
                mask=valid_m[:, None] & (offs_p < P)[None, :],
                other=0.0,
            )
            ds = tl.load(
                dstate + offs_p[:, None] * N + offs_n[None, :],
                mask=(offs_p < P)[:, None] & (offs_n < N)[None, :],
                other=0.0,
            )
            acc_h = _mm(x_tile, ds, acc_h, DOT_DTYPE, PRECISION, INTERPRET)
        dacs_row = dacs_ptr + ((bi * H + hi) * nc + ci) * L
        a_m = tl.load(dacs_row + offs_m, mask=offs_m < L, other=0.0)
        a_end = tl.load(dacs_row + L - 1)
        dt_m = tl.load(
            dt_ptr + bi * s_dt_b + (t0 + offs_m) * s_dt_t + hi * s_dt_h, mask=valid_m, other=0.0
        ).to(tl.float32)
        acc += acc_h * tl.where(end_m, tl.exp(a_end - a_m) * dt_m, 0.0)[:, None]
    dcb = dcb_ptr + ((bi * nc + ci) * G + gi) * L * L
    c_chunk = c_ptr + bi * s_c_b + t0 * s_c_t + gi * s_c_g
    for u0 in range(pid_m * BLOCK_M, L, BLOCK_T):
        offs_t = u0 + tl.arange(0, BLOCK_T)
        valid_t = (offs_t < L) & (t0 + offs_t < T)
        causalT = (offs_m[:, None] <= offs_t[None, :]) & valid_m[:, None] & valid_t[None, :]
        dcbT = tl.load(dcb + offs_t[None, :] * L + offs_m[:, None], mask=causalT, other=0.0)
        c_tile = tl.load(
            c_chunk + offs_t[:, None] * s_c_t + offs_n[None, :] * s_c_n,
            mask=valid_t[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        acc = _mm(dcbT, c_tile, acc, DOT_DTYPE, PRECISION, INTERPRET)
    db = db_ptr + bi * s_b_b + (t0 + offs_m)[:, None] * s_b_t + gi * s_b_g
    tl.store(
        db + offs_n[None, :] * s_b_n,
        acc.to(db_ptr.dtype.element_ty),
        mask=valid_m[:, None] & (offs_n < N)[None, :],
    )


@triton.jit
def _ddt_combine_kernel(
    rowdot_ptr, rowq_ptr, colq_ptr, ddt_x_ptr, r_state_ptr, ddacs_end_ptr, dt_ptr, A_ptr,
    ddt_ptr, da_part_ptr,
    T, L, nc, H, Tpad, n_tiles, TILE, s_q,
    s_dt_b, s_dt_t, s_dt_h,
    s_ddt_b, s_ddt_t, s_ddt_h,
    BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """ddt and per-chunk dA partials from the per-step sums; grid (b * nc, cdiv(H, BLOCK_H))."""
    bi, ci, t0 = _chunk_ids(tl.program_id(0), nc, L)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, BLOCK_L)
    valid_h = offs_h < H
    mask = valid_h[:, None] & ((offs_l < L) & (t0 + offs_l < T))[None, :]
    rows = (bi * H + offs_h)[:, None] * Tpad + t0 + offs_l[None, :]
    # dL/da_t: +a_t in y_t (state part and intra rows), -a_s in the later terms (intra columns,
    # chunk state)
    da = tl.load(rowdot_ptr + rows, mask=mask, other=0.0)
    tile = offs_l // TILE
    rowq = rowq_ptr + rows
    colq = colq_ptr + rows
    for i in range(n_tiles):  # partials exist only for tiles on or below the diagonal
        da += tl.load(rowq, mask=mask & (i <= tile)[None, :], other=0.0)
        da -= tl.load(colq, mask=mask & (i >= tile)[None, :], other=0.0)
        rowq += s_q  # pointer steps: no i * s_q product that could pass 2^31
        colq += s_q
    ddt_x = tl.load(ddt_x_ptr + rows, mask=mask, other=0.0)
    r_state = tl.load(r_state_ptr + rows, mask=mask, other=0.0)
    # the end-of-chunk decay a_end (= a at step L - 1; padded steps add 0) collects the terms of
    # the chunk state and of state passing
    end_share = tl.sum(r_state, axis=1)
    end_share += tl.load(ddacs_end_ptr + (bi * H + offs_h) * nc + ci, mask=valid_h, other=0.0)
    da += tl.where(offs_l == L - 1, 1.0, 0.0)[None, :] * end_share[:, None] - r_state
    ddA = tl.cumsum(da, axis=1, reverse=True)
    dt = tl.load(
        dt_ptr + bi * s_dt_b + (t0 + offs_l)[None, :] * s_dt_t + offs_h[:, None] * s_dt_h,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    A = tl.load(A_ptr + offs_h, mask=valid_h, other=0.0).to(tl.float32)
    ddt = ddt_x + A[:, None] * ddA
    tl.store(
        ddt_ptr + bi * s_ddt_b + (t0 + offs_l)[None, :] * s_ddt_t + offs_h[:, None] * s_ddt_h,
        ddt.to(ddt_ptr.dtype.element_ty),
        mask=mask,
    )
    da_part = tl.sum(tl.where(mask, ddA * dt, 0.0), axis=1)
    tl.store(da_part_ptr + (bi * nc + ci) * H + offs_h, da_part, mask=valid_h)


# ----------------------------------------------------------------------------- launchers


class Grads(NamedTuple):
    """Gradients of the scan's inputs, each in its input's dtype (d_initial_state: fp32 if none)."""

    dx: torch.Tensor
    ddt: torch.Tensor
    dA: torch.Tensor
    dB: torch.Tensor
    dC: torch.Tensor
    d_initial_state: torch.Tensor


def _state_passing_bwd(
    dstates: torch.Tensor,
    states: torch.Tensor,
    dfinal: torch.Tensor | None,
    dacs: torch.Tensor,
    doc: torch.Tensor | None,
    geo: Geometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place Dy -> dS on ``dstates``; returns (d_initial [b,H,P,N], ddacs_end [b,H,nc]) fp32."""
    pn = geo.P * geo.N
    blk = min(triton.next_power_of_2(pn), 16 * tile_cap())
    n_tiles = triton.cdiv(pn, blk)
    dinit = new_buffer((geo.b, geo.H, geo.P, geo.N), torch.float32, states.device)
    ddacs_end = new_buffer((n_tiles, geo.b, geo.H, geo.nc), torch.float32, states.device)
    if dfinal is not None:
        dfinal = dfinal.reshape(geo.b, geo.H, pn)  # a view when P, N are contiguous
    f_strides = (0, 0, 0) if dfinal is None else dfinal.stride()
    _state_passing_bwd_kernel[(n_tiles, geo.b, geo.H)](
        dstates, states, states if dfinal is None else dfinal, dinit, dacs,
        dacs if doc is None else doc, ddacs_end,
        geo.b, geo.L, geo.nc, geo.H, pn, geo.Tpad, *f_strides,
        HAS_DFINAL=dfinal is not None, HAS_DOC=doc is not None, BLOCK=blk,
    )  # fmt: skip
    return dinit, ddacs_end.sum(dim=0)


def _dx(dy, x, dt, B, cb, dacs, dstates, doc, geo: Geometry, dots: dict):
    """(dx in x's dtype, sum_p x du [b,H,nc*L], sum_p u du_state [b,H,nc*L])."""
    dx = new_buffer(tuple(x.shape), x.dtype, x.device)
    ddt_x = new_buffer((geo.b, geo.H, geo.Tpad), torch.float32, x.device)
    r_state = new_buffer((geo.b, geo.H, geo.Tpad), torch.float32, x.device)
    bm = block(geo.L)
    _chunk_scan_bwd_dx_kernel[(geo.b * geo.nc, triton.cdiv(geo.L, bm), geo.H)](
        cb, dy, x, dt, dacs, B, dstates, dacs if doc is None else doc, dx, ddt_x, r_state,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.G, geo.P, geo.N, geo.Tpad,
        *x.stride(), *dy.stride(), *B.stride(), *dt.stride(), *dx.stride(),
        HAS_DOC=doc is not None,
        BLOCK_M=bm, BLOCK_P=block(geo.P, 256), BLOCK_K=block(geo.N), BLOCK_T=bm, **dots,
    )  # fmt: skip
    return dx, ddt_x, r_state


def _dcb(dy, x, dt, cb, dacs, doc, geo: Geometry, dots: dict):
    """(dcb [b, nc, G, L, L], rowq, colq [n_tiles, b, H, nc * L]) fp32; see the kernel."""
    bm = block(geo.L)
    n_tiles = triton.cdiv(geo.L, bm)
    dcb = new_buffer((geo.b, geo.nc, geo.G, geo.L, geo.L), torch.float32, x.device)
    rowq = new_buffer((n_tiles, geo.b, geo.H, geo.Tpad), torch.float32, x.device)
    colq = new_buffer((n_tiles, geo.b, geo.H, geo.Tpad), torch.float32, x.device)
    _chunk_scan_bwd_dcb_kernel[(geo.b * geo.nc, n_tiles**2, geo.G)](
        dy, x, dt, dacs, dacs if doc is None else doc, cb, dcb, rowq, colq,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.G, geo.P, geo.Tpad, rowq.stride(0),
        *x.stride(), *dy.stride(), *dt.stride(),
        HAS_DOC=doc is not None, BLOCK_M=bm, BLOCK_N=bm, BLOCK_P=block(geo.P), **dots,
    )  # fmt: skip
    return dcb, rowq, colq


def _dc_db(dy, x, dt, B, C, dacs, states, dstates, dcb, doc, geo: Geometry, dots: dict):
    """(dC, dB), each [b, T, G, N] in its input's dtype."""
    dC = new_buffer(tuple(C.shape), C.dtype, C.device)
    dB = new_buffer(tuple(B.shape), B.dtype, B.device)
    bm, bn, bp = block(geo.L), block(geo.N), block(geo.P)
    grid = (geo.b * geo.nc, triton.cdiv(geo.L, bm) * triton.cdiv(geo.N, bn), geo.G)
    doc_arg = dacs if doc is None else doc
    _chunk_scan_bwd_dc_kernel[grid](
        dy, states, dcb, B, dacs, doc_arg, dC,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.G, geo.P, geo.N, geo.Tpad,
        *dy.stride(), *B.stride(), *dC.stride(),
        HAS_DOC=doc is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, BLOCK_S=bm, **dots,
    )  # fmt: skip
    _chunk_scan_bwd_db_kernel[grid](
        x, dstates, dcb, C, dt, dacs, doc_arg, dB,
        geo.T, geo.L, geo.nc, geo.H, geo.R, geo.G, geo.P, geo.N, geo.Tpad,
        *x.stride(), *C.stride(), *dt.stride(), *dB.stride(),
        HAS_DOC=doc is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, BLOCK_T=bm, **dots,
    )  # fmt: skip
    return dC, dB


def _ddt_dA(rowdot, rowq, colq, ddt_x, r_state, ddacs_end, dt, A, geo: Geometry):
    """(ddt in dt's dtype, dA in A's dtype)."""
    ddt = new_buffer(tuple(dt.shape), dt.dtype, dt.device)
    da_part = new_buffer((geo.b * geo.nc, geo.H), torch.float32, dt.device)
    block_l = triton.next_power_of_2(geo.L)
    block_h = max(1, min(triton.next_power_of_2(geo.H), 4096 // block_l))
    tile = block(geo.L)  # the L tile of _dcb, which wrote rowq and colq
    _ddt_combine_kernel[(geo.b * geo.nc, triton.cdiv(geo.H, block_h))](
        rowdot, rowq, colq, ddt_x, r_state, ddacs_end, dt, A, ddt, da_part,
        geo.T, geo.L, geo.nc, geo.H, geo.Tpad, triton.cdiv(geo.L, tile), tile, rowq.stride(0),
        *dt.stride(), *ddt.stride(),
        BLOCK_H=block_h, BLOCK_L=block_l,
    )  # fmt: skip
    return ddt, da_part.sum(dim=0).to(A.dtype)


def ssd_backward(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> Grads:
    """Gradients of the scan given dy [b, T, H, P] and dfinal [b, H, P, N] (None: zero).

    Recomputes the forward pieces, then runs the backward kernels listed in the module docstring.
    """
    with device_guard(x):
        fw = forward_parts(x, dt, A, B, C, chunk_size, initial_state, seq_idx)
        geo, dots, doc = fw.geo, fw.dots, fw.doc
        dstates = chunk_state(dy, C, dt, fw.dacs, doc, geo, dots, from_start=True)
        dinit, ddacs_end = _state_passing_bwd(dstates, fw.states, dfinal, fw.dacs, doc, geo)
        rowdot = chunk_scan(fw.cb, x, dt, fw.dacs, C, fw.states, doc, geo, dots, dy=dy)
        dx, ddt_x, r_state = _dx(dy, x, dt, B, fw.cb, fw.dacs, dstates, doc, geo, dots)
        dcb, rowq, colq = _dcb(dy, x, dt, fw.cb, fw.dacs, doc, geo, dots)
        dC, dB = _dc_db(dy, x, dt, B, C, fw.dacs, fw.states, dstates, dcb, doc, geo, dots)
        ddt, dA = _ddt_dA(rowdot, rowq, colq, ddt_x, r_state, ddacs_end, dt, A, geo)
    if initial_state is not None:
        dinit = dinit.to(initial_state.dtype)
    return Grads(dx, ddt, dA, dB, dC, dinit)
