"""Product-key memory layer (Lample et al. 2019, "Large Memory Layers with Product Keys").

Each token builds one query per head, finds its ``top_k`` best keys among K = n_subkeys**2
product keys (exact search at the cost of 2 * n_subkeys dot products), and reads the
softmax-weighted sum of those value rows. The output is the sum over heads.

The layer works token by token: it is causal by construction and ``seq_idx`` (packed documents)
does not change anything, so it is accepted and ignored.

Shape legend: B batch, T time, D d_model, N = B*T tokens, H heads, Dk query size,
S n_subkeys, R = S*S value rows, k top_k, Dv value size.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kernels.pkm import pkm_select
from kernels.pkm.op import pkm_lookup
from pretrain.models.common.layers import RMSNorm
from pretrain.models.common.span_timer import SpanTimer
from pretrain.models.config import PKMConfig


class ValueLookup(Protocol):
    """The weighted bag of value rows: ``out[t] = sum_j weights[t, j] * values[indices[t, j]]``.

    One process: ``kernels.pkm.op.pkm_lookup`` on the whole table. A sharded table gets
    ``parallel.pkm.ShardedBagLookup`` installed from outside (model files know no process
    group).
    """

    def __call__(
        self, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, backend: str
    ) -> torch.Tensor: ...


class UsageReducer(Protocol):
    """Sums a tensor over every rank (``parallel.expert.GroupReducer``); no-op with one process."""

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...


class ProductKeyMemory(nn.Module):
    """Multi-head product-key memory; returns the memory read, which the block adds to x.

    Parameters:
        norm: RMSNorm of the input.
        query: Linear D -> H*Dk (no bias).
        query_norm: RMSNorm over each query half (Dk/2 channels, gain shared by heads and halves).
            It replaces the paper's BatchNorm (which couples the tokens of a batch) and keeps
            the two half-searches on the same scale.
        subkeys: [H, 2, S, Dk/2] sub-keys of the two halves, per head.
        values: nn.Embedding(R, Dv); its parameter is named ``values.weight`` so the optimizer
            can give it its own learning rate and no weight decay.
        out: Linear Dv -> D, only when Dv != D.

    Buffer ``usage_counts`` [R] (int64, not persistent) counts how often each row was read in
    training mode since the last ``reset_usage()``; ``key_usage()`` turns it into the fraction of
    rows used, over every rank's tokens when a ``reducer`` is installed (a collective then).
    ``lookup_timer`` times the bag (forward and backward) of each eager training step (a compiled
    block is not split around the lookup, so its time reads 0).
    """

    # The block gives it the raw residual: it applies its own input RMSNorm (self.norm).
    normalizes_input = True
    kernel_op = "pkm"  # which kernel backend setting applies (see kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends
    lookup: ValueLookup = staticmethod(pkm_lookup)  # replaced by a sharded one (parallel.pkm)
    reducer: UsageReducer | None = None  # sums the usage counts over ranks (installed outside)

    def __init__(self, d_model: int, cfg: PKMConfig, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.d_model = d_model
        self.n_heads = cfg.n_heads
        self.n_subkeys = cfg.n_subkeys
        self.top_k = cfg.top_k
        self.d_key = cfg.d_key
        self.d_value = cfg.d_value if cfg.d_value is not None else d_model
        self.n_rows = cfg.n_subkeys**2
        self.norm = RMSNorm(d_model, norm_eps)
        self.query = nn.Linear(d_model, cfg.n_heads * cfg.d_key, bias=False)
        self.query_norm = RMSNorm(cfg.d_key // 2, norm_eps)
        self.subkeys = nn.Parameter(torch.empty(cfg.n_heads, 2, cfg.n_subkeys, cfg.d_key // 2))
        self.values = nn.Embedding(self.n_rows, self.d_value)
        self.out = nn.Linear(self.d_value, d_model, bias=False) if self.d_value != d_model else None
        self.register_buffer(
            "usage_counts", torch.zeros(self.n_rows, dtype=torch.long), persistent=False
        )
        self.lookup_timer = SpanTimer()
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        """(Re)initialise parameters and clear the usage counts.

        Sub-keys ~ N(0, 1/(Dk/2)) so that each has about unit norm, matching the RMS-normalised
        half-queries: half scores start with unit variance. Values ~ N(0, Dv**-0.5) as in the
        paper's code, so a read (a convex mix of rows per head) starts with an RMS of about
        Dv**-0.5 per channel. Linears get a truncated normal of std ``init_std``.
        """
        self.norm.init_weights(init_std)
        self.query_norm.init_weights(init_std)
        nn.init.trunc_normal_(self.query.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.normal_(self.subkeys, mean=0.0, std=(self.d_key // 2) ** -0.5)
        nn.init.normal_(self.values.weight, mean=0.0, std=self.d_value**-0.5)
        if self.out is not None:
            nn.init.trunc_normal_(self.out.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        self.reset_usage()

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and weights read by each token.

        Args:
            x: [B, T, D] input (the residual stream).

        Returns:
            indices: [B*T, H*k] int64 value rows; weights: [B*T, H*k] fp32, each head's k sum to 1.
        """
        q = self.query(self.norm(x)).reshape(-1, self.n_heads, 2, self.d_key // 2)
        q = self.query_norm(q).reshape(-1, self.n_heads, self.d_key)  # [N, H, Dk]
        # The search runs in fp32 even under bf16 autocast: bf16 scores would reorder near-ties
        # of the top-k and blur the softmax.
        with torch.autocast(device_type=x.device.type, enabled=False):
            subkeys = self.subkeys
            if q.dtype != torch.float64:
                q, subkeys = q.float(), subkeys.float()
            return pkm_select(q, subkeys, self.top_k)

    def forward(
        self, x: torch.Tensor, seq_idx: torch.Tensor | None = None, *, context: object = None
    ) -> torch.Tensor:
        """Read the memory for every token.

        Args:
            x: [B, T, D] input (the residual stream).
            seq_idx: [B, T] document ids; ignored (the layer acts on each token alone).
            context: the sequence context; ignored likewise (per token: nothing to exchange
                under context parallelism).

        Returns:
            [B, T, D] the memory read (sum over heads), in ``x``'s dtype.
        """
        batch, seq_len, _ = x.shape
        indices, weights = self.select(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.training:
                self._count_usage(indices)
            if self.training and not torch.compiler.is_compiling():
                read = self._timed_lookup(indices, weights)  # [N, Dv]
            else:  # a compiled block is not split around the lookup to time it
                read = self.lookup(self.values.weight, indices, weights, self.kernel_backend)
        read = read.reshape(batch, seq_len, self.d_value).to(x.dtype)
        return self.out(read) if self.out is not None else read

    # timers and hooks are host-side work: kept out of a compiled block's graph
    @torch.compiler.disable
    def _timed_lookup(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The lookup, its forward and backward timed by ``lookup_timer``."""
        timer, device = self.lookup_timer, indices.device
        start = timer.mark(device)
        read = self.lookup(self.values.weight, indices, weights, self.kernel_backend)
        timer.add(start, timer.mark(device))
        timer.time_backward(read, weights)
        return read

    @torch.no_grad()
    def _count_usage(self, indices: torch.Tensor) -> None:
        flat = indices.reshape(-1)
        self.usage_counts.index_add_(0, flat, torch.ones_like(flat))

    def key_usage(self) -> float:
        """Fraction of the R value rows read at least once in training mode since the last reset
        (by any rank, when a ``reducer`` is installed: every rank must call it then)."""
        counts = self.usage_counts if self.reducer is None else self.reducer.sum(self.usage_counts)
        return (counts > 0).float().mean().item()

    def after_optimizer_step(self, stepped: bool) -> None:
        """Close the step's lookup timing (``lookup_timer.last_step_s()`` reads it)."""
        self.lookup_timer.end_step()

    def reset_usage(self) -> None:
        """Clear the usage counts (e.g. after each logging interval)."""
        self.usage_counts.zero_()

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token (``seq_len``-free): ``query``, ``search`` (the two
        half-searches over the sub-keys), ``lookup`` (the weighted sum of the
        ``n_heads * top_k`` rows read) and ``out`` (Dv -> D, only when Dv != D)."""
        out = {
            "query": 2.0 * self.query.weight.numel(),
            "search": 2.0 * self.n_heads * 2 * self.n_subkeys * (self.d_key // 2),
            "lookup": 2.0 * self.n_heads * self.top_k * self.d_value,
        }
        if self.out is not None:
            out["out"] = 2.0 * self.out.weight.numel()
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

    def active_params(self) -> int:
        """Parameters one token's forward touches: all but the value rows it does not read."""
        rows, d_value = self.values.weight.shape
        rows_read = min(rows, self.n_heads * self.top_k)
        total = sum(p.numel() for p in self.parameters())
        return total - rows * d_value + rows_read * d_value
