"""Depth attention: at iteration r of the shared layer, each position attends over its own states
from the earlier iterations (and the layer's input), never over other positions.

Shape legend: B batch, T time, D d_model, H depth heads, K head dim (D / H), R iterations.

The memory entry j is the state h_j that entered iteration j: h_0 is the shared layer's input
(the prelude's output) and h_j (j >= 1) the output of iteration j - 1. Iteration r reads entries
0..r, the last of which is its own input, so it sees exactly the iterations before it. Keys and
values are projections of the stored states (``keys_values``), made once per state: the memory
of one forward is O(R * T * D) per layer (2 * D values per token and iteration: one key and one
value vector), and attention over it is per token, so the path is causal in sequence by
construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.models.common.layers import RMSNorm
from pretrain.models.common.sequence import SequenceContext


@dataclass(frozen=True)
class DepthState:
    """What iteration r of the shared layer knows of depth: r and the memory entries 0..r-1
    (the layer adds entry r, its own input, itself)."""

    index: int  # r
    index_tensor: torch.Tensor  # r as a 0-d int64 tensor (compiled code does not specialise on r)
    keys: tuple[torch.Tensor, ...] = ()  # [B, T, H, K] per memory entry
    values: tuple[torch.Tensor, ...] = ()

    def extended(self, key: torch.Tensor, value: torch.Tensor) -> DepthState:
        """This state with one more memory entry (a new object: recomputation stays exact)."""
        return DepthState(self.index, self.index_tensor, (*self.keys, key), (*self.values, value))


def first_depth_state(device: torch.device) -> DepthState:
    """The state of iteration 0: an empty memory."""
    return DepthState(0, torch.zeros((), dtype=torch.long, device=device))


def next_depth_state(state: DepthState) -> DepthState:
    """The state of the next iteration, with the memory ``state`` ended with."""
    return DepthState(state.index + 1, state.index_tensor + 1, state.keys, state.values)


class DepthAttention(nn.Module):
    """Per-position softmax attention over the memory of earlier depth states.

    Args:
        d_model: D.
        n_heads: H (must divide D).
        recurrence: R at evaluation, for the FLOP count (the memory grows with R).
        norm_eps: epsilon of the norm applied to stored states before their projections.
    """

    uses_depth = True  # the shared layer passes ``depth=`` to this path

    def __init__(self, d_model: int, n_heads: int, recurrence: int, norm_eps: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"depth_heads={n_heads} must divide d_model={d_model}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.recurrence = recurrence
        self.state_norm = RMSNorm(d_model, norm_eps)
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        self.state_norm.init_weights(init_std)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)

    def keys_values(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state h_j [B, T, D] (un-normalised residual) -> its key and value [B, T, H, K]."""
        B, T, _ = state.shape
        x = self.state_norm(state)
        shape = (B, T, self.n_heads, self.head_dim)
        return self.wk(x).view(shape), self.wv(x).view(shape)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        depth: DepthState,
    ) -> torch.Tensor:
        """x [B, T, D] (normalised by the layer) -> [B, T, D]: attention over ``depth``'s memory.

        The scores are one dot product per memory entry (no [.., R, ..] copy of the memory is
        made, so backward keeps only the entries themselves).
        """
        B, T, D = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim) / math.sqrt(self.head_dim)
        scores = torch.stack([(q * k).sum(-1) for k in depth.keys], dim=-1)  # [B, T, H, r+1]
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        out = probs[..., 0, None] * depth.values[0]
        for j in range(1, len(depth.values)):
            out = out + probs[..., j, None] * depth.values[j]
        return self.wo(out.reshape(B, T, D))

    def flops_breakdown_for_runs(self, seq_len: int, runs: float) -> dict[str, float]:
        """Forward FLOPs per token of ``runs`` iterations, by part: per iteration ``qkv`` (the
        query and the key/value of the one state it stores) and ``out`` (D x D matmuls), and
        ``scores``: at iteration r, q.k and p.v over r + 1 entries (elementwise products and
        sums, no matmul)."""
        d = self.wq.weight.shape[0]
        return {
            "qkv": runs * 2 * 3 * d * d,
            "scores": 2 * 2 * d * runs * (runs + 1) / 2,
            "out": runs * 2 * d * d,
        }

    def flops_for_runs(self, seq_len: int, runs: float) -> float:
        """Forward FLOPs per token of ``runs`` iterations (the sum of the breakdown)."""
        return sum(self.flops_breakdown_for_runs(seq_len, runs).values())

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token and iteration, averaged over R = ``recurrence`` iterations."""
        return self.flops_for_runs(seq_len, self.recurrence) / self.recurrence

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Nothing is kept across positions: a decoded token rebuilds its own depth memory."""
        return 0
