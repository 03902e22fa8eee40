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

Under context parallelism a unit that begins on an earlier rank's slice is routed on that
first token too: every rank all-gathers the hidden state of its last unit start ([B, D] per rank
and layer), and a slice whose first unit began earlier routes it on the owner's token, so the
decision (and its gradient, which flows back to the owner) is the one of a single process. Such
a borrowed unit counts in the balance statistics only on the rank that owns its first token.

Router (fp32, no bias): ``logits = x_first @ W_r^T``; ``scores = softmax(logits)`` or
``sigmoid(logits)`` (``cfg.score_func``). The k experts are the top-k of ``scores + expert_bias``;
``expert_bias`` (DeepSeek-V3 aux-loss-free balancing) changes only *which* experts are chosen. The
combine weights are the chosen scores renormalised to sum to 1, for both score functions (for
softmax: the top-k probabilities divided by their sum).

Communication goes through two small interfaces that ``parallel/`` installs from outside (model
code imports nothing from ``torch.distributed``); both default to one process:
- ``dispatcher`` (``ExpertDispatcher``): sends the expert-sorted rows to the ranks that hold their
  experts and brings the outputs back (expert parallelism). ``LOCAL_EXPERTS`` does nothing.
- ``reducer`` (``RankReducer``): sums routing statistics over every rank that routes tokens, so
  that the balance loss, the z-loss and the routing-bias update are functions of the global
  batch, as in one process. ``None``: this process is the whole batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kernels.moe.op import swiglu_experts
from kernels.moe.ref import sorted_moe
from pretrain.models.common.selection import max_set_entropy_bits, set_entropy_bits
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import MoEConfig


class MoERouting(NamedTuple):
    """The routing decision of one forward (all float tensors in the router's fp32/fp64)."""

    unit_of_token: torch.Tensor  # [N] int64, routing unit of each flattened token (b * T + t)
    expert_idx: torch.Tensor  # [U, k] int64, chosen experts of each unit
    weights: torch.Tensor  # [U, k] combine weights of each unit (sum to 1 per unit)
    logits: torch.Tensor  # [U, E] router logits
    probs: torch.Tensor  # [U, E] router probabilities (sum to 1 per unit), for the balance loss
    # [U] bool, units whose first token is on this rank (None: all); only these count in the
    # balance statistics (a unit continued from an earlier context-parallel slice is not)
    owned: torch.Tensor | None = None


class ExpertDispatcher(Protocol):
    """Moves expert-sorted rows to the rank of their expert and the outputs back."""

    def dispatch(
        self, x_sorted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """[M, D] rows grouped by global expert, [E] counts -> (rows for this rank's experts
        grouped by local expert, their [E_local] counts, a handle for ``combine``)."""
        ...

    def combine(self, y_local: torch.Tensor, handle: Any) -> torch.Tensor:
        """Expert outputs of the local rows -> [M, D] outputs in ``x_sorted``'s order."""
        ...


class LocalExperts:
    """Every expert is on this rank: dispatch and combine are the identity (no copies)."""

    def dispatch(
        self, x_sorted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        return x_sorted, counts, None

    def combine(self, y_local: torch.Tensor, handle: None) -> torch.Tensor:
        return y_local


LOCAL_EXPERTS = LocalExperts()


class RankReducer(Protocol):
    """Sums tensors over every rank that routes tokens."""

    n_ranks: int  # ranks whose gradients are averaged (the data-parallel world)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (no gradient), as a new tensor."""
        ...


class GroupedExperts(nn.Module):
    """The stacked SwiGLU experts of one MoE layer (its own module so that parallelism can
    shard it apart from the router: split over expert-parallel ranks, FSDP over others).

    ``shard_view`` maps a stored weight to the [E_local, ...] slice this rank computes with
    (identity in one process; ``parallel.expert`` installs DTensor's ``to_local`` followed by a
    1/ep gradient scale, see that module).
    """

    kernel_op = "moe"  # which kernel backend setting applies (see kernels.backends)
    kernel_backend = "torch"  # set per instance by apply_kernel_backends

    def __init__(self, n_experts: int, d_model: int, d_expert: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))  # [E, D, F] gate
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))  # [E, D, F] up
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # [E, F, D] down
        self.shard_view = _identity

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[M, D] rows grouped by (local) expert, [E_local] counts -> [M, D] expert outputs."""
        w1, w3, w2 = (self.shard_view(w) for w in (self.w1, self.w3, self.w2))
        return swiglu_experts(x_sorted, counts, w1, w3, w2, backend=self.kernel_backend)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _in_backward() -> bool:
    """True while autograd runs a backward, e.g. an activation-checkpoint recompute of forward
    (call it eagerly: see ``ChunkMoE._record_if_training``)."""
    return torch._C._current_graph_task_id() != -1


class ChunkMoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts, routed per chunk (or per token).

    Args:
        d_model: D.
        cfg: the MoE section of the model config.
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        n_exp, d_exp = cfg.n_experts, cfg.d_expert
        # experts first: parameters keep the order they had as direct attributes (w1, w3, w2,
        # router), so gradient-norm sums, and hence the numbers, stay those of earlier versions
        self.experts = GroupedExperts(n_exp, d_model, d_exp)
        self.router = nn.Linear(d_model, n_exp, bias=False)
        self.dispatcher: ExpertDispatcher = LOCAL_EXPERTS
        self.reducer: RankReducer | None = None
        # selection bias of the aux-loss-free balancing: part of the model state (checkpointed)
        self.register_buffer("expert_bias", torch.zeros(n_exp), persistent=True)
        # (token, slot) assignments per expert since the last optimizer step; not checkpointed
        self.register_buffer("tokens_per_expert", torch.zeros(n_exp), persistent=False)
        # the load of the last optimizer step, summed over every routing rank (for metrics)
        self.register_buffer("step_load", torch.zeros(n_exp), persistent=False)
        # the [N, k] experts of the last training forward (selection-diversity metrics)
        self.last_selection: torch.Tensor | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02) -> None:
        """Router normal(std), experts truncated normal(std, +-3 std); balancing state zeroed."""
        nn.init.normal_(self.router.weight, std=init_std)
        for w in (self.experts.w1, self.experts.w3, self.experts.w2):
            nn.init.trunc_normal_(w, std=init_std, a=-3 * init_std, b=3 * init_std)
        # buffers are uninitialised after a meta-device build + to_empty()
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
        self.step_load.zero_()

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        **route_kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each unit on its first token, then run its tokens through the chosen experts.

        Args:
            x: [B, T, D] hidden states (already normalised by the block).
            seq_idx: optional [B, T] int64 document index of each token (packed rows).
            context: the sequence context (replaces ``seq_idx``; places a context-parallel
                slice in its rows).
            route_kw: what a subclass's ``router_logits`` and ``_record_load`` need besides
                the hidden states (Dreamer's expert attention: the depth); none here.

        Returns:
            y: [B, T, D] in ``x.dtype``.
            aux_loss: scalar, ``aux_loss_coef * balance + z_loss_coef * z`` (a zero tensor when
                both coefficients are 0). See ``aux_loss``.
        """
        batch, seq_len, d_model = x.shape
        routing = self.route(x, context=resolve_context(x, seq_idx, context), **route_kw)
        tok_expert = routing.expert_idx.index_select(0, routing.unit_of_token)  # [N, k]
        tok_weight = routing.weights.index_select(0, routing.unit_of_token)  # [N, k]
        ex = self.experts
        y = sorted_moe(
            x.reshape(batch * seq_len, d_model),
            tok_expert,
            tok_weight,
            (ex.w1, ex.w3, ex.w2),  # global shapes (DTensors under EP and FSDP) for the checks
            self._dispatched_experts,
        )
        self._record_if_training(tok_expert, **route_kw)
        return y.reshape(batch, seq_len, d_model).to(x.dtype), self.aux_loss(routing)

    def _dispatched_experts(
        self, x_sorted: torch.Tensor, counts: torch.Tensor, *weights: torch.Tensor
    ) -> torch.Tensor:
        """The expert compute of ``sorted_moe``: rows to the ranks of their experts, through the
        experts module (so that FSDP2 gathers it), and back."""
        x_local, local_counts, handle = self.dispatcher.dispatch(x_sorted, counts)
        return self.dispatcher.combine(self.experts(x_local, local_counts), handle)

    def unit_starts(self, doc_pos: torch.Tensor) -> torch.Tensor:
        """[B, T] bool: True where a token starts a routing unit (document-relative chunks), from
        each token's (global) position in its document ``doc_pos`` [B, T]."""
        if self.cfg.routing == "token":
            return torch.ones_like(doc_pos, dtype=torch.bool)
        return doc_pos % self.cfg.chunk_size == 0

    def route(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        *,
        context: SequenceContext | None = None,
        **route_kw: Any,
    ) -> MoERouting:
        """Routing decision of every unit, from the hidden state of its first token.

        Args:
            x: [B, T, D] hidden states.
            seq_idx: optional [B, T] document index of each token.
            context: the sequence context (replaces ``seq_idx``).
            route_kw: passed to ``router_logits``.

        Returns:
            The ``MoERouting`` (units numbered in row-major token order).
        """
        batch, seq_len, d_model = x.shape
        context = resolve_context(x, seq_idx, context)
        starts = self.unit_starts(context.doc_pos)  # [B, T]
        borrowed_rows = None
        if context.split and self.cfg.routing == "chunk":
            borrowed_rows = ~starts[:, 0]  # the row's first unit began on an earlier slice
            carried = self._earlier_first_tokens(x, starts, context)  # [B, D]
            starts = starts.clone()
            starts[:, 0] = True
        starts = starts.reshape(-1)  # [N]
        # every row starts a unit (position 0), so unit ids are a running count
        unit_of_token = starts.long().cumsum(0) - 1  # [N]
        first_token = starts.nonzero().squeeze(1)  # [U]
        x_units = x.reshape(batch * seq_len, d_model).index_select(0, first_token)  # [U, D]
        owned = None
        if borrowed_rows is not None:
            row_unit = unit_of_token.view(batch, seq_len)[:, 0]  # [B] first unit of each row
            borrowed = torch.zeros(x_units.shape[0], dtype=torch.bool, device=x.device)
            borrowed = borrowed.index_copy(0, row_unit, borrowed_rows)
            carried_units = torch.zeros_like(x_units).index_copy(0, row_unit, carried.to(x.dtype))
            x_units = torch.where(borrowed[:, None], carried_units, x_units)
            owned = ~borrowed
        # fp32 at least (fp64 in fp64 tests): routing decisions must not flip under bf16
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = self.router_logits(x_units.to(dtype), **route_kw)  # [U, E]
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
        return MoERouting(unit_of_token, expert_idx, weights, logits, probs, owned)

    def router_logits(self, x_units: torch.Tensor) -> torch.Tensor:
        """[U, D] first-token states (router dtype, autocast off) -> [U, E] router logits."""
        return F.linear(x_units, self.router.weight.to(x_units.dtype))

    def _earlier_first_tokens(
        self, x: torch.Tensor, starts: torch.Tensor, context: SequenceContext
    ) -> torch.Tensor:
        """[B, D] hidden state of the first token of the unit each row's slice begins inside.

        Every rank contributes the state of its last unit start (zeros where its slice has none);
        the unit's owner is the rank of its first token, known from the global positions.
        """
        batch, seq_len = starts.shape
        pos = torch.arange(seq_len, device=x.device)
        last = torch.where(starts, pos, -1).amax(dim=1)  # [B], -1: no unit starts here
        rows = torch.arange(batch, device=x.device)
        mine = x[rows, last.clamp(min=0)] * (last >= 0)[:, None].to(x.dtype)
        gathered = context.comm.all_gather(mine, "moe_route_carry")  # [cp, B, D]
        first_pos = context.offset - context.doc_pos[:, 0] % self.cfg.chunk_size  # [B]
        return gathered[first_pos // seq_len, rows]

    def aux_loss(self, routing: MoERouting) -> torch.Tensor:
        """Auxiliary router loss of one forward (averaged over routing units).

        ``balance = E * sum_e f_e * P_e`` (Switch Transformer, top-k form): ``f_e`` is the
        fraction of the U * k (unit, slot) assignments that went to e (no gradient), ``P_e`` the
        mean router probability of e over units (softmax probabilities; for sigmoid scores,
        the scores normalised to sum to 1 per unit); it is 1 for a perfectly uniform router.
        Units are weighted equally (a chunk of C tokens counts once).
        ``z = mean_u logsumexp(logits_u)^2`` (ST-MoE router z-loss).

        With a ``reducer`` (several ranks), ``f_e``, the unit count and the means are those of
        the global batch (the counts are summed over the routing ranks), and each rank returns
        ``n_ranks`` times its share, so that the data-parallel gradient average is the gradient
        of the global loss and the mean over ranks of the value is the one-process value.

        Returns:
            Scalar ``aux_loss_coef * balance + z_loss_coef * z`` (fp32 or wider).
        """
        loss = routing.logits.new_zeros(())
        if self.cfg.aux_loss_coef <= 0 and self.cfg.z_loss_coef <= 0:
            return loss
        if routing.owned is not None:  # units borrowed from an earlier slice count there
            keep = routing.owned
            routing = routing._replace(
                expert_idx=routing.expert_idx[keep],
                logits=routing.logits[keep],
                probs=routing.probs[keep],
                owned=None,
            )
        logits = routing.logits
        n_units, n_exp = routing.probs.shape
        if n_units == 0 and self.reducer is None:  # every unit borrowed: nothing counts here
            return loss
        with torch.no_grad():
            counts = torch.bincount(routing.expert_idx.reshape(-1), minlength=n_exp)
        if self.reducer is not None and self.training:
            return self._global_aux_loss(routing, counts.to(logits.dtype))
        if self.cfg.aux_loss_coef > 0:
            frac = counts.to(logits.dtype) / (n_units * self.cfg.top_k)
            balance = n_exp * (frac * routing.probs.mean(dim=0)).sum()
            loss = loss + self.cfg.aux_loss_coef * balance
        if self.cfg.z_loss_coef > 0:
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            loss = loss + self.cfg.z_loss_coef * z_loss
        return loss

    def _global_aux_loss(self, routing: MoERouting, counts: torch.Tensor) -> torch.Tensor:
        """``aux_loss`` over the global batch: this rank's share, times ``n_ranks``."""
        logits = routing.logits
        n_units, n_exp = routing.probs.shape
        stats = self.reducer.sum(torch.cat([counts, counts.new_tensor([n_units])]))
        counts_all, units_all = stats[:n_exp], stats[n_exp].clamp_min(1.0)
        scale = self.reducer.n_ranks / units_all
        loss = logits.new_zeros(())
        if self.cfg.aux_loss_coef > 0:
            frac = counts_all / (units_all * self.cfg.top_k)
            balance = n_exp * (frac * routing.probs.sum(dim=0)).sum() * scale
            loss = loss + self.cfg.aux_loss_coef * balance
        if self.cfg.z_loss_coef > 0:
            z_loss = torch.logsumexp(logits, dim=-1).square().sum() * scale
            loss = loss + self.cfg.z_loss_coef * z_loss
        return loss

    # eager even inside a compiled forward: traced, the backward check would be frozen to False
    # and an activation-checkpoint recompute would count the load a second time
    @torch.compiler.disable
    def _record_if_training(self, tok_expert: torch.Tensor, **route_kw: Any) -> None:
        """Count a training forward's choices (never a recompute of it in backward)."""
        if self.training and not _in_backward():
            self._record_load(tok_expert, **route_kw)

    @torch.no_grad()
    def _record_load(self, tok_expert: torch.Tensor) -> torch.Tensor:
        """Count this forward's [N, k] choices into the step's load; returns the [E] counts."""
        counts = torch.bincount(tok_expert.reshape(-1), minlength=self.cfg.n_experts)
        self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))
        self.last_selection = tok_expert.detach()
        return counts

    @torch.no_grad()
    def after_optimizer_step(self, stepped: bool) -> None:
        """Once per optimizer step, after all micro-batches: the aux-loss-free balancing step.

        On a step that updated the weights (``stepped``), the load counted since the last call is
        summed over every routing rank (``reducer``), kept in ``step_load`` and, with
        ``bias_update_rate > 0``, moves the bias: ``expert_bias += rate * sign(mean_load -
        load)`` (under-loaded experts become more likely to be chosen); every rank applies the
        same update. A skipped step (non-finite loss) changes nothing. The counts are then reset.
        """
        load = self.tokens_per_expert
        if not stepped:
            self.step_load.zero_()  # no load to report for a step that did not happen
        else:
            if self.reducer is not None:
                load.copy_(self.reducer.sum(load))
            self.step_load.copy_(load)
            rate = self.cfg.bias_update_rate
            if rate > 0:
                self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        load.zero_()

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the router and the top-k of E experts (``seq_len``-free)."""
        experts = sum(w.numel() for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        return 2 * (self.router.weight.numel() + experts * self.cfg.top_k / self.cfg.n_experts)

    def active_params(self) -> int:
        """Parameters one token's forward touches: the router and top_k / E of the experts."""
        total = sum(p.numel() for p in self.parameters())
        expert_params = sum(p.numel() for p in self.experts.parameters())
        return total - expert_params + expert_params * self.cfg.top_k // self.cfg.n_experts

    def selection_metrics(self) -> dict[str, float]:
        """Diversity of the last training forward's choices: entropy (bits) of the k-expert
        sets over its tokens, and its maximum log2 C(E, k) (``pretrain.models.common.selection``)."""
        if self.last_selection is None:
            return {}
        return {
            "set_entropy_bits": set_entropy_bits(self.last_selection, self.cfg.n_experts),
            "set_entropy_max_bits": max_set_entropy_bits(self.cfg.n_experts, self.cfg.top_k),
        }

    def expert_load(self) -> torch.Tensor:
        """[E] fraction of the (token, slot) assignments per expert in the last optimizer step,
        over every routing rank. All zeros before the first step (or in eval only)."""
        load = self.step_load
        return load / load.sum().clamp_min(1.0)
