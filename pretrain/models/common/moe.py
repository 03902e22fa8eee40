"""Chunk-level mixture of SwiGLU experts (dropless), with aux-loss and bias load balancing.

Shape legend: B batch, T time, D d_model, E experts, k experts per routing unit, F expert hidden
size (``cfg.d_expert``), C chunk size, N = B * T tokens.

A *routing unit* is a group of tokens that share one routing decision (k experts and k combine
weights), made from the hidden state of the unit's FIRST token only:
- ``routing="chunk"``: the unit is (row, document, chunk-in-document). Chunks of C positions are
  counted from each document's start (``positions_in_document``), so a packed row routes exactly
  like its documents run one by one, and a unit never mixes two documents. The first token of a
  unit is at or before every token of the unit, hence routing is causal.
- ``routing="token"``: every token is its own unit.

Shapes never depend on the packing (no ``nonzero``, no host sync), so a block compiles into one
graph: the router runs on every token and each token takes its unit's first-token logits
(a gather along T), which gives each token of a unit the same decision, and a per-token mask
(``MoERouting.counted``) marks the units' first tokens, the ones the balance statistics count.
The router's cost is then per token, as ``flops_per_token`` counts it.

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

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from kernels.moe.op import swiglu_experts
from kernels.moe.ref import expert_counts, sorted_moe
from pretrain.models.common.layers import wide_linear
from pretrain.models.common.selection import max_set_entropy_bits, set_entropy_bits
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import MoEConfig


class MoERouting(NamedTuple):
    """The routing decision of one forward, per token (float tensors in the router's fp32/fp64).

    Every token carries its unit's decision; ``counted`` marks one token per unit (its first), so
    ``expert_idx[counted]`` are the units' choices.
    """

    expert_idx: torch.Tensor  # [N, k] int64, chosen experts of each token's unit
    weights: torch.Tensor  # [N, k] combine weights (sum to 1 per token)
    logits: torch.Tensor  # [N, E] router logits of each token's unit
    probs: torch.Tensor  # [N, E] router probabilities (sum to 1 per token), for the balance loss
    # [N] bool, the first token of every unit whose first token is on this rank: only these count
    # in the balance statistics (a unit continued from an earlier context-parallel slice does not)
    counted: torch.Tensor


@dataclass
class RoutingCache:
    """Chunk routing's decode state: the router logits [B, E] of the first token of the unit
    the last decoded token belongs to (the later tokens of that unit route on them)."""

    logits: torch.Tensor


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
    (call it eagerly: see ``record_expert_choices``)."""
    return torch._C._current_graph_task_id() != -1


# The MoE layers that record their choices, by ``ChunkMoE.recorder_key`` (an opaque op takes
# tensors, not modules). Weak: a layer that is gone leaves.
_RECORDERS: weakref.WeakValueDictionary[int, ChunkMoE] = weakref.WeakValueDictionary()
_recorder_ids = itertools.count()


# Declared functional (it mutates no argument); its Python side effects (the layer's selection,
# and the load through its result) run because ``_add_load`` consumes the result, so a compiler
# cannot drop the call. Under CUDA graphs (``mode="reduce-overhead"``) a replay would skip the
# Python body: its 0-d CPU key input keeps Inductor from graphing the block.
@torch.library.custom_op("hydra_pretrain::record_expert_choices", mutates_args=())
def record_expert_choices(
    expert_idx: torch.Tensor,
    recorder_key: torch.Tensor,
    n_experts: int,
    depth_index: torch.Tensor | None,
) -> torch.Tensor:
    """[E] counts of a training forward's [N, k] choices, after the layer kept them for its
    metrics (``ChunkMoE.keep_selection``); zeros in an activation-checkpoint recompute.

    An opaque op, so inside a compiled graph it is neither a graph break nor traced: the
    recompute check runs at run time, every call (traced, it would be frozen to its value at
    trace time, and a recompute would count the load twice). ``recorder_key``: the layer's
    0-d CPU int64 key (a tensor, not an int, so that the layers of a model share one compiled
    graph instead of one per layer); ``depth_index``: the depth of a layer looped over depth
    (Dreamer's expert attention), else None.
    """
    if _in_backward():
        return expert_idx.new_zeros(n_experts)
    layer = _RECORDERS.get(int(recorder_key))
    if layer is None:
        raise RuntimeError(f"record_expert_choices: no MoE layer has key {int(recorder_key)}")
    kw = {} if depth_index is None else {"depth_index": depth_index}
    layer.keep_selection(expert_idx.clone(), **kw)  # a copy: a graph may reuse the buffer
    return expert_counts(expert_idx, n_experts)


@record_expert_choices.register_fake
def _(
    expert_idx: torch.Tensor,
    recorder_key: torch.Tensor,
    n_experts: int,
    depth_index: torch.Tensor | None,
) -> torch.Tensor:
    return expert_idx.new_empty(n_experts)


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
        self._register_recorder()
        self.init_weights()

    def _register_recorder(self) -> None:
        key = next(_recorder_ids)
        # a plain attribute, not a buffer: it stays on the CPU (also when built on meta)
        self.recorder_key = torch.tensor(key, dtype=torch.int64, device="cpu")
        _RECORDERS[key] = self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._register_recorder()  # a copy records into itself, not into its original

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
        cache: RoutingCache | None = None,
        **route_kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route each unit on its first token, then run its tokens through the chosen experts.

        Args:
            x: [B, T, D] hidden states (already normalised by the block).
            seq_idx: optional [B, T] int64 document index of each token (packed rows).
            context: the sequence context (replaces ``seq_idx``; places a context-parallel
                slice in its rows).
            cache: decoding (chunk routing): the routing of the unit the previous call ended
                in, which x continues at ``context.offset``; updated in place.
            route_kw: what a subclass's ``router_logits``, ``_add_load`` and
                ``keep_selection`` need besides the hidden states (Dreamer's expert attention:
                the depth); none here.

        Returns:
            y: [B, T, D] in ``x.dtype``.
            aux_loss: scalar, ``aux_loss_coef * balance + z_loss_coef * z`` (a zero tensor when
                both coefficients are 0). See ``aux_loss``.
        """
        batch, seq_len, d_model = x.shape
        context = resolve_context(x, seq_idx, context)
        routing = self.route(x, context=context, cache=cache, **route_kw)
        ex = self.experts
        y = sorted_moe(
            x.reshape(batch * seq_len, d_model),
            routing.expert_idx,
            routing.weights,
            (ex.w1, ex.w3, ex.w2),  # global shapes (DTensors under EP and FSDP) for the checks
            self._dispatched_experts,
        )
        self._record_if_training(routing.expert_idx, **route_kw)
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
        cache: RoutingCache | None = None,
        **route_kw: Any,
    ) -> MoERouting:
        """Routing decision of every unit, from the hidden state of its first token.

        Args:
            x: [B, T, D] hidden states.
            seq_idx: optional [B, T] document index of each token.
            context: the sequence context (replaces ``seq_idx``).
            cache: decoding: the unit begun in an earlier call (see ``forward``).
            route_kw: passed to ``router_logits``.

        Returns:
            The ``MoERouting``, per token in row-major order.
        """
        batch, seq_len, d_model = x.shape
        context = resolve_context(x, seq_idx, context)
        starts = self.unit_starts(context.doc_pos)  # [B, T]
        # fp32 at least (fp64 in fp64 tests): routing decisions must not flip under bf16
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            # every token's logits, then each token takes its unit's first token's: the router
            # costs D E per token (as counted), and backward keeps x itself (in its own dtype:
            # ``wide_linear``), no gathered or upcast [N, D] copy
            logits = self.router_logits(x.reshape(-1, d_model), **route_kw)  # [N, E]
            logits = logits.view(batch, seq_len, -1)
            if self.cfg.routing == "chunk":
                pos = torch.arange(seq_len, device=x.device)
                # every token's unit start (0 for tokens before a row's first start: a unit
                # that began on an earlier context-parallel slice, replaced below)
                first_pos = torch.where(starts, pos, 0).cummax(dim=1).values  # [B, T]
                logits = logits.gather(1, first_pos[..., None].expand_as(logits))
                carried_logits = None
                if context.split:
                    carried = self._earlier_first_tokens(x, starts, context)  # [B, D]
                    carried_logits = self.router_logits(carried.to(x.dtype), **route_kw)
                elif cache is not None:  # decoding: a unit the previous call began
                    carried_logits = cache.logits.to(logits.dtype)
                if carried_logits is not None:
                    borrowed = starts.long().cumsum(dim=1) == 0  # [B, T] in a unit begun earlier
                    logits = torch.where(borrowed[..., None], carried_logits[:, None], logits)
                if cache is not None:
                    cache.logits = logits[:, -1]
        logits = logits.reshape(batch * seq_len, -1)  # [N, E]
        if self.cfg.score_func == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        biased = scores.detach() + self.expert_bias.to(dtype)
        expert_idx = biased.topk(self.cfg.top_k, dim=-1).indices  # [N, k]
        chosen = scores.gather(-1, expert_idx)
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
        return MoERouting(expert_idx, weights, logits, probs, starts.reshape(-1))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[M, D] token states (any dtype) -> [M, E] router logits in fp32 at least."""
        return wide_linear(x, self.router.weight)

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
        logits = routing.logits
        unit = routing.counted.to(logits.dtype)  # [N] 1 at each counted unit's first token
        with torch.no_grad():
            counts = expert_counts(routing.expert_idx, self.cfg.n_experts, unit)  # [E]
        n_units = unit.sum()
        if self.reducer is not None and self.training:
            stats = self.reducer.sum(torch.cat([counts, n_units[None]]))
            counts, n_units = stats[:-1], stats[-1]
            scale = self.reducer.n_ranks  # each rank returns n_ranks times its share
        else:
            scale = 1.0
        # sums over this rank's units, normalised by the (global) unit count; 0 with no units
        n_units = n_units.clamp_min(1.0)
        per_unit = scale / n_units
        if self.cfg.aux_loss_coef > 0:
            frac = counts / (n_units * self.cfg.top_k)
            mean_probs = (routing.probs * unit[:, None]).sum(dim=0) * per_unit
            loss = loss + self.cfg.aux_loss_coef * self.cfg.n_experts * (frac * mean_probs).sum()
        if self.cfg.z_loss_coef > 0:
            z_loss = (torch.logsumexp(logits, dim=-1).square() * unit).sum() * per_unit
            loss = loss + self.cfg.z_loss_coef * z_loss
        return loss

    def _record_if_training(self, expert_idx: torch.Tensor, **route_kw: Any) -> None:
        """Count a training forward's [N, k] choices into the step's load (never a recompute of
        it in backward: ``record_expert_choices`` returns zeros there)."""
        if self.training:
            counts = record_expert_choices(
                expert_idx, self.recorder_key, self.cfg.n_experts, route_kw.get("depth_index")
            )
            with torch.no_grad():
                self._add_load(counts, **route_kw)

    def _add_load(self, counts: torch.Tensor, **route_kw: Any) -> None:
        """Add one forward's [E] counts to the load since the last optimizer step."""
        self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))

    def keep_selection(self, expert_idx: torch.Tensor, **route_kw: Any) -> None:
        """Keep a training forward's [N, k] choices for ``selection_metrics``."""
        self.last_selection = expert_idx

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

    def cache_bytes(self, context_len: int, bytes_per_elem: int = 2) -> int:
        """Bytes of one sequence's decode state: with chunk routing the fp32 router logits [E]
        of the current unit's first token (``RoutingCache``); token routing keeps nothing."""
        return self.cfg.n_experts * 4 if self.cfg.routing == "chunk" else 0

    def decode_state(
        self,
        batch: int,
        context_len: int = 0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> RoutingCache | None:
        """A ``RoutingCache`` of ``batch`` sequences (chunk routing), None for token routing."""
        if self.cfg.routing != "chunk":
            return None
        device = device if device is not None else self.router.weight.device
        logits = torch.zeros(batch, self.cfg.n_experts, device=device, dtype=torch.float32)
        return RoutingCache(logits=logits)

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token (``seq_len``-free): ``router``, every token's logits (see the
        module docstring), and ``experts``, the top-k of E SwiGLU experts (dropless)."""
        experts = sum(w.numel() for w in (self.experts.w1, self.experts.w2, self.experts.w3))
        return {
            "router": 2.0 * self.router.weight.numel(),
            "experts": 2 * experts * self.cfg.top_k / self.cfg.n_experts,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (the sum of ``flops_breakdown``)."""
        return sum(self.flops_breakdown(seq_len).values())

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
