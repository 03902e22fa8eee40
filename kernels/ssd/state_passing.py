"""Passing SSD states between slices of one sequence (context parallelism), pure PyTorch.

Shape legend: b batch, T slice length, H heads, P head dim, G B/C groups, N state size, n slices.

The scan is affine in its initial state. For a slice scanned from a zero state, with ``h_in`` the
state that the sequence carries into it (belonging to the slice's first document)::

    y_t     = y_local_t + C_t . (exp(a_1 + ... + a_t) h_in)       (t in the first document)
    h_out   = decay * h_in + h_local,   decay = exp(a_1 + ... + a_T)  (0 when a document starts
                                                                       inside the slice)

with ``a_t = dt_t * A``. So each slice scans from zero, the slices exchange ``(h_local, decay)``
(one ``[b, H, P, N]`` state and ``[b, H]`` decays each, whatever T is), every slice folds the
ones before it into its ``h_in`` (``incoming_state``), and corrects its output
(``initial_state_output``). Everything runs in fp32 at least; gradients flow through all three.
"""

from __future__ import annotations

import torch


def slice_decay(log_decay: torch.Tensor, passthrough: torch.Tensor) -> torch.Tensor:
    """Total decay of a slice: [b, T, H] log-decays ``dt * A``, [b] passthrough -> [b, H].

    ``passthrough``: the slice is one document that continues from the slice before it, so the
    incoming state reaches its end; where False the slice's final state forgets ``h_in`` (0).
    """
    return torch.exp(log_decay.sum(dim=1)) * passthrough[:, None].to(log_decay.dtype)


def incoming_state(states: torch.Tensor, decays: torch.Tensor, rank: int) -> torch.Tensor:
    """The state entering slice ``rank``: slices 0 .. rank-1 folded in order.

    Args:
        states: [n, b, H, P, N] each slice's final state scanned from zero.
        decays: [n, b, H] each slice's ``slice_decay``.
        rank: the slice whose incoming state is wanted (0 gets zeros).

    Returns:
        [b, H, P, N] ``h_in`` (fp32 or wider), ``h_in(r) = decay_{r-1} h_in(r-1) + states_{r-1}``.
    """
    h = torch.zeros_like(states[0])
    for j in range(rank):
        h = decays[j][..., None, None] * h + states[j]
    return h


def initial_state_output(
    C: torch.Tensor, log_decay: torch.Tensor, h_in: torch.Tensor, first_document: torch.Tensor
) -> torch.Tensor:
    """What ``h_in`` adds to the outputs of a slice scanned from zero.

    Args:
        C: [b, T, G, N] output projections (head h reads group h // (H // G)).
        log_decay: [b, T, H] ``dt * A``.
        h_in: [b, H, P, N] incoming state.
        first_document: [b, T] bool, positions of the document ``h_in`` belongs to (False
            everywhere in a row whose slice starts a document).

    Returns:
        [b, T, H, P] ``C_t . exp(cumsum(a)_t) h_in`` on the first document, 0 elsewhere.
    """
    acc = torch.promote_types(h_in.dtype, torch.float32)
    decay = torch.exp(log_decay.to(acc).cumsum(dim=1)) * first_document[..., None].to(acc)
    return _DecayedReadout.apply(C.to(acc), decay, h_in.to(acc))


class _DecayedReadout(torch.autograd.Function):
    """``out[b,t,h,p] = decay[b,t,h] sum_n C[b,t,g(h),n] h_in[b,h,p,n]`` keeping only its inputs
    for the backward (autograd would keep a [b, T, H, P] product, or C repeated per head
    [b, T, H, N], per layer: gigabytes at 64K tokens).

    Shapes: C [b, T, G, N], decay [b, T, H], h_in [b, H, P, N]; heads grouped as (G, R).
    """

    @staticmethod
    def forward(ctx, C, decay, h_in):  # noqa: ANN001
        ctx.save_for_backward(C, decay, h_in)
        b, T, G, _ = C.shape
        H = decay.shape[-1]
        h = h_in.unflatten(1, (G, H // G))  # [b, G, R, P, N]
        read = torch.einsum("btgn,bgrpn->btgrp", C, h)
        return (read * decay.view(b, T, G, H // G, 1)).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        C, decay, h_in = ctx.saved_tensors
        b, T, G, _ = C.shape
        H = decay.shape[-1]
        h = h_in.unflatten(1, (G, H // G))
        g = grad.unflatten(2, (G, H // G))  # [b, T, G, R, P]
        g_decayed = g * decay.view(b, T, G, H // G, 1)
        grad_C = torch.einsum("btgrp,bgrpn->btgn", g_decayed, h)
        grad_h = torch.einsum("btgrp,btgn->bgrpn", g_decayed, C).flatten(1, 2)
        read = torch.einsum("btgn,bgrpn->btgrp", C, h)  # recomputed: a transient [b, T, H, P]
        grad_decay = (g * read).sum(dim=-1).flatten(2, 3)
        return grad_C, grad_decay, grad_h
