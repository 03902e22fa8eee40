"""Pure-PyTorch references of the Mamba-2 SSD scan (state-space duality).

Shape legend: b batch, T time, H heads, P head dim, G B/C groups (H % G == 0), R = H // G heads
per group, N state size, c chunks, L chunk length (``chunk_size``).

The op, defined by ``ssd_scan_sequential``::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        h: [b, H, P, N]
    y_t = h_t . C_t                                                 (contract over N)

Head h reads group h // R of B and C. Where ``seq_idx`` changes between t-1 and t a new document
starts: h_{t-1} is replaced by zeros before the update, so nothing crosses the boundary; an
``initial_state`` belongs to the first document of the row only. ``final_state`` is h_{T-1}.

``ssd_scan_chunked`` computes the same op with the chunked algorithm of Mamba-2 (Dao & Gu 2024):
matmuls inside chunks and a small recurrence between chunks. Everything is accumulated in fp32 at
least (fp64 stays fp64); y comes back in x's dtype, the state in the accumulation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [b, T, H, P], got {tuple(x.shape)}")
    b, T, H, P = x.shape
    if T < 1:
        raise ValueError("the scan needs at least one time step")
    if tuple(dt.shape) != (b, T, H):
        raise ValueError(f"dt must be [b, T, H] = {(b, T, H)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (H,):
        raise ValueError(f"A must be [H] = {(H,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, T) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be [b, T, G, N], got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    G, N = B.shape[2:]
    if H % G:
        raise ValueError(f"n_groups={G} must divide n_heads={H}")
    if initial_state is not None and tuple(initial_state.shape) != (b, H, P, N):
        raise ValueError(
            f"initial_state must be [b, H, P, N] = {(b, H, P, N)}, got {tuple(initial_state.shape)}"
        )
    if seq_idx is not None and tuple(seq_idx.shape) != (b, T):
        raise ValueError(f"seq_idx must be [b, T] = {(b, T)}, got {tuple(seq_idx.shape)}")


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Renumber documents as 0, 1, 2, ... per row: [b, T] int64.

    Only a *change* of ``seq_idx`` starts a document, so equal ids mean "same document" even if a
    caller's numbering is not monotonic.
    """
    starts = torch.zeros_like(seq_idx, dtype=torch.long)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return starts.cumsum(dim=1)


def ssd_scan_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence, one time step at a time (the definition; slow, for tests).

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes, already softplus'ed (> 0).
        A: [H] negative decay rates.
        B: [b, T, G, N] input projections (head h uses group h // (H // G)).
        C: [b, T, G, N] output projections.
        initial_state: [b, H, P, N] state before t = 0 (zeros if None); applies to the first
            document of each row only.
        seq_idx: [b, T] document index per position (None: one document per row).

    Returns:
        y [b, T, H, P] in x's dtype and final_state [b, H, P, N] (h_{T-1}) in the accumulation
        dtype (fp32, or fp64 for fp64 inputs).
    """
    _check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    b, T, H, P = x.shape
    N = B.shape[-1]
    rep = H // B.shape[2]
    acc = _accum_dtype(x.dtype)
    x_, dt_ = x.to(acc), dt.to(acc)
    B_ = B.to(acc).repeat_interleave(rep, dim=2)  # [b, T, H, N]
    C_ = C.to(acc).repeat_interleave(rep, dim=2)
    decay = torch.exp(dt_ * A.to(acc))  # [b, T, H]
    if initial_state is None:
        h = x.new_zeros((b, H, P, N), dtype=acc)
    else:
        h = initial_state.to(acc)
    keep = None
    if seq_idx is not None:
        keep = torch.ones((b, T), dtype=acc, device=x.device)
        keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(acc)
    ys = []
    for t in range(T):
        if keep is not None:
            h = h * keep[:, t, None, None, None]
        inp = (dt_[:, t, :, None] * x_[:, t])[..., None] * B_[:, t, :, None, :]  # [b, H, P, N]
        h = decay[:, t, :, None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_[:, t]))
    return torch.stack(ys, dim=1).to(x.dtype), h


def _segsum(a: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """Log-decays between positions: [..., L] -> [..., L, L].

    out[..., t, s] = a[s+1] + ... + a[t] for s <= t, and -inf where s > t or where t and s lie in
    different documents (so exp() of it is the masked decay matrix). Each entry is a cumsum over
    a masked copy rather than a difference of two long cumsums, which keeps it accurate when the
    total decay is large.

    Args:
        a: [..., L] log-decays (<= 0).
        doc: [..., L] document ids broadcastable to ``a``, or None.
    """
    L = a.shape[-1]
    strict = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # k > s
    a_ks = a[..., :, None].expand(*a.shape, L).masked_fill(~strict, 0.0)  # [..., k, s] = a[k]
    seg = a_ks.cumsum(dim=-2)
    keep = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(0)
    if doc is not None:
        keep = keep & (doc[..., :, None] == doc[..., None, :])
    return seg.masked_fill(~keep, float("-inf"))


def _pad_time(t: torch.Tensor, pad: int, replicate: bool = False) -> torch.Tensor:
    """Pad dim 1 (time) on the right, with zeros or by repeating the last step."""
    if pad == 0:
        return t
    if replicate:
        return torch.cat([t, t[:, -1:].expand(-1, pad, *t.shape[2:])], dim=1)
    return F.pad(t, [0, 0] * (t.dim() - 2) + [0, pad])


def ssd_scan_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan by the chunked (matmul) algorithm of Mamba-2; same op as ``ssd_scan_sequential``.

    Any T works: the last chunk is padded with dt = 0 (decay 1, no input), which leaves the state
    unchanged. Document resets are masks on the decay matrices (exp(-inf) = 0 across a boundary).

    Args:
        x: [b, T, H, P] inputs.
        dt: [b, T, H] step sizes, already softplus'ed (> 0).
        A: [H] negative decay rates.
        B: [b, T, G, N] input projections (head h uses group h // (H // G)).
        C: [b, T, G, N] output projections.
        chunk_size: L, the chunk length.
        initial_state: [b, H, P, N] state before t = 0 (zeros if None); first document only.
        seq_idx: [b, T] document index per position (None: one document per row).

    Returns:
        y [b, T, H, P] in x's dtype and final_state [b, H, P, N] in the accumulation dtype.
    """
    _check_inputs(x, dt, A, B, C, initial_state, seq_idx)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, T, H, P = x.shape
    G, N = B.shape[2:]
    R, L = H // G, chunk_size
    acc = _accum_dtype(x.dtype)
    pad = (-T) % L
    nc = (T + pad) // L
    x_ = _pad_time(x.to(acc), pad).view(b, nc, L, G, R, P)
    B_ = _pad_time(B.to(acc), pad).view(b, nc, L, G, N)
    C_ = _pad_time(C.to(acc), pad).view(b, nc, L, G, N)
    dt_ = _pad_time(dt.to(acc), pad).view(b, nc, L, G, R).permute(0, 1, 3, 4, 2)  # [b,c,G,R,L]
    dA = dt_ * A.to(acc).view(G, R, 1)  # [b, c, G, R, L]
    doc = doc_chunk = doc_before = None
    if seq_idx is not None:
        doc = _pad_time(document_ids(seq_idx), pad, replicate=True).view(b, nc, L)
        doc_chunk = doc[:, :, None, None, :]  # broadcast over G, R
        # document of the position just before each chunk (the initial state counts as doc 0)
        doc_before = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)  # [b, c]

    # 1. inside each chunk: y_t = sum_{s <= t} (C_t . B_s) * decay(s -> t) * dt_s * x_s
    decay = torch.exp(_segsum(dA, doc_chunk))  # [b, c, G, R, L(t), L(s)]
    scores = torch.einsum("bclgn,bcsgn->bcgls", C_, B_)  # [b, c, G, L, L]
    mix = scores[:, :, :, None] * decay * dt_[..., None, :]  # [b, c, G, R, L, L]
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", mix, x_)

    # 2. state of each chunk at its end, from its own inputs only (row t = L-1 of the decay)
    w_end = decay[..., -1, :] * dt_  # [b, c, G, R, L]
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B_, x_ * w_end.permute(0, 1, 4, 2, 3)[..., None])

    # 3. pass states between chunks: state entering chunk c, and the final one
    if initial_state is None:
        init = x_.new_zeros((b, 1, G, R, P, N))
    else:
        init = initial_state.to(acc).view(b, 1, G, R, P, N)
    states = torch.cat([init, states], dim=1)  # [b, c+1, G, R, P, N]
    chunk_dA = F.pad(dA.sum(dim=-1).permute(0, 2, 3, 1), (1, 0))  # [b, G, R, c+1]
    doc_ends = None
    if doc is not None:
        doc_ends = torch.cat([doc[:, :1, 0], doc[:, :, -1]], dim=1)[:, None, None, :]  # [b,1,1,c+1]
    passing = torch.exp(_segsum(chunk_dA, doc_ends))  # [b, G, R, c+1, c+1]
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", passing, states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. contribution of the entering state: decay from the chunk start up to t, then read by C_t
    w_start = torch.exp(dA.cumsum(dim=-1))  # [b, c, G, R, L]
    if doc is not None:
        w_start = w_start * (doc == doc_before[..., None])[:, :, None, None, :].to(acc)
    y_state = (
        torch.einsum("bclgn,bcgrpn->bclgrp", C_, entering)
        * w_start.permute(0, 1, 4, 2, 3)[..., None]
    )
    y = (y + y_state).reshape(b, nc * L, H, P)[:, :T]
    return y.to(x.dtype), final_state.reshape(b, H, P, N)
