"""Chunk-level mixture of SwiGLU experts (dropless), with aux-loss and bias load balancing.

Shape legend: B batch, T time, D d_model, E experts, k experts per routing unit, F expert hidden
size (``cfg.d_expert``), C chunk size, N = B * T tokens, U routing units.

A *routing unit* is a group of tokens that share one routing decision (k experts and k combine
weights), made from the hidden state of the unit's FIRST token only:
- ``routing="chunk"``: the unit is (row, document, chunk-in-document). Chunks of C positions are
  counted from each document's start (``positions_in_document``), so a packed row routes exactly
  like its documents run one by one, and a unit never mixes two documents. The first token of a
  unit is at or before every token of the unit, hence routing is causal.
- ``routing="token"``: every token is its own unit.

Router (fp32, no bias): ``logits = x_first @ W_r^T``; ``scores = softmax(logits)`` or
``sigmoid(logits)`` (``cfg.score_func``). The k experts are the top-k of ``scores + expert_bias``;
``expert_bias`` (DeepSeek-V3 aux-loss-free balancing) changes only *which* experts are chosen. The
combine weights are the chosen scores renormalised to sum to 1, for both score functions (for
softmax: the top-k probabilities divided by their sum).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe.op import moe_experts
from pretrain.models.common.documents import positions_in_document
from pretrain.models.config import MoEConfig


class MoERouting(NamedTuple):
    """The routing decision of one forward (all float tensors in the router's fp32/fp64)."""

    unit_of_token: torch.Tensor  # [N] int64, routing unit of each flattened token (b * T + t)
    expert_idx: torch.Tensor  # [U, k] int64, chosen experts of each unit
    weights: torch.Tensor  # [U, k] combine weights of each unit (sum to 1 per unit)
    logits: torch.Tensor  # [U, E] router logits
    probs: torch.Tensor  # [U, E] router probabilities (sum to 1 per unit), for the balance loss


def _in_backward() -> bool:
    """True while autograd runs a backward, e.g. an activation-checkpoint recompute of forward."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class ChunkMoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts, routed per chunk (or per token).

    Args:
        d_model: D.
        cfg: the MoE section of the model config.
    """

    kernel_op = "moe"  # which kernel backend setting applies (see kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        n_exp, d_exp = cfg.n_experts, cfg.d_expert
        self.router = nn.Linear(d_model, n_exp, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_exp, d_model, d_exp))  # [E, D, F] gate
        self.w3 = nn.Parameter(torch.empty(n_exp, d_model, d_exp))  # [E, D, F] up
        self.w2 = nn.Parameter(torch.empty(n_exp, d_exp, d_model))  # [E, F, D] down
        # selection bias of the aux-loss-free balancing: part of the model state (checkpointed)
        self.register_buffer("expert_bias", torch.zeros(n_exp), persistent=True)
        # (token, slot) assignments per expert since the last optimizer step; not checkpointed
        self.register_buffer("tokens_per_expert", torch.zeros(n_exp), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02) -> None:
        """Router normal(std), experts truncated normal(std, +-3 std); balancing state zeroed."""
        nn.init.normal_(self.router.weight, std=init_std)
        for w in (self.w1, self.w3, self.w2):
            nn.init.trunc_normal_(w, std=init_std, a=-3 * init_std, b=3 * init_std)
        # buffers are uninitialised after a meta-device build + to_empty()
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def forward(
        self, x: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each unit on its first token, then run its tokens through the chosen experts.

        Args:
            x: [B, T, D] hidden states (already normalised by the block).
            seq_idx: optional [B, T] int64 document index of each token (packed rows).

        Returns:
            y: [B, T, D] in ``x.dtype``.
            aux_loss: scalar, ``aux_loss_coef * balance + z_loss_coef * z`` (a zero tensor when
                both coefficients are 0). See ``aux_loss``.
        """
        batch, seq_len, d_model = x.shape
        routing = self.route(x, seq_idx)
        tok_expert = routing.expert_idx.index_select(0, routing.unit_of_token)  # [N, k]
        tok_weight = routing.weights.index_select(0, routing.unit_of_token)  # [N, k]
        y = moe_experts(
            x.reshape(batch * seq_len, d_model),
            tok_expert,
            tok_weight,
            self.w1,
            self.w3,
            self.w2,
            backend=self.kernel_backend,
        )
        if self.training and not _in_backward():
            self._record_load(tok_expert)
        return y.reshape(batch, seq_len, d_model).to(x.dtype), self.aux_loss(routing)

    def unit_starts(
        self, seq_idx: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
    ) -> torch.Tensor:
        """[B, T] bool: True where a token starts a routing unit (document-relative chunks)."""
        if self.cfg.routing == "token":
            return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
        pos = positions_in_document(seq_idx, batch, seq_len, device)
        return pos % self.cfg.chunk_size == 0

    def route(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None) -> MoERouting:
        """Routing decision of every unit, from the hidden state of its first token.

        Args:
            x: [B, T, D] hidden states.
            seq_idx: optional [B, T] document index of each token.

        Returns:
            The ``MoERouting`` (units numbered in row-major token order).
        """
        batch, seq_len, d_model = x.shape
        starts = self.unit_starts(seq_idx, batch, seq_len, x.device).reshape(-1)  # [N]
        # every row starts a unit (position 0 of a document), so unit ids are a running count
        unit_of_token = starts.long().cumsum(0) - 1  # [N]
        first_token = starts.nonzero().squeeze(1)  # [U]
        x_units = x.reshape(batch * seq_len, d_model).index_select(0, first_token)  # [U, D]
        # fp32 at least (fp64 in fp64 tests): routing decisions must not flip under bf16
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x_units.to(dtype), self.router.weight.to(dtype))  # [U, E]
        if self.cfg.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        biased = scores.detach() + self.expert_bias.to(dtype)
        expert_idx = biased.topk(self.cfg.top_k, dim=-1).indices  # [U, k]
        chosen = scores.gather(-1, expert_idx)
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        return MoERouting(unit_of_token, expert_idx, weights, logits, probs)

    def aux_loss(self, routing: MoERouting) -> torch.Tensor:
        """Auxiliary router loss of one forward (averaged over routing units).

        ``balance = E * sum_e f_e * P_e`` (Switch Transformer, top-k form): ``f_e`` is the
        fraction of the U * k (unit, slot) assignments that went to e (no gradient), ``P_e`` the
        mean router probability of e over units (softmax probabilities; for sigmoid scores,
        the scores normalised to sum to 1 per unit); it is 1 for a perfectly uniform router.
        Units are weighted equally (a chunk of C tokens counts once).
        ``z = mean_u logsumexp(logits_u)^2`` (ST-MoE router z-loss).

        Returns:
            Scalar ``aux_loss_coef * balance + z_loss_coef * z`` (fp32 or wider).
        """
        logits = routing.logits
        loss = logits.new_zeros(())
        if self.cfg.aux_loss_coef > 0:
            n_units, n_exp = routing.probs.shape
            with torch.no_grad():
                counts = torch.bincount(routing.expert_idx.reshape(-1), minlength=n_exp)
                frac = counts.to(logits.dtype) / (n_units * self.cfg.top_k)
            balance = n_exp * (frac * routing.probs.mean(dim=0)).sum()
            loss = loss + self.cfg.aux_loss_coef * balance
        if self.cfg.z_loss_coef > 0:
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            loss = loss + self.cfg.z_loss_coef * z_loss
        return loss

    @torch.no_grad()
    def _record_load(self, tok_expert: torch.Tensor) -> None:
        counts = torch.bincount(tok_expert.reshape(-1), minlength=self.cfg.n_experts)
        self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))

    @torch.no_grad()
    def update_routing_bias(self) -> None:
        """Aux-loss-free balancing step; call once per optimizer step, after all micro-batches.

        With ``bias_update_rate > 0``: ``expert_bias += rate * sign(mean_load - load)`` (under-
        loaded experts become more likely to be chosen). Then the load counts are reset, whatever
        the rate. Under data parallelism, sum ``tokens_per_expert`` over the data-parallel ranks
        before calling this, so that every rank applies the same update.
        """
        load = self.tokens_per_expert
        rate = self.cfg.bias_update_rate
        if rate > 0:
            self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        load.zero_()

    def expert_load(self) -> torch.Tensor:
        """[E] fraction of the (token, slot) assignments per expert since the last bias update.

        All zeros when nothing was recorded (eval mode only, or right after an update).
        """
        load = self.tokens_per_expert
        return load / load.sum().clamp_min(1.0)
