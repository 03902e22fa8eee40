"""Expert parallelism for ``ChunkMoE``: experts split over the ``ep`` ranks, rows sent to them.

Each EP rank holds ``n_experts / ep`` consecutive experts (expert ``e`` lives on EP rank
``e // (n_experts / ep)``), stored as DTensors ``Shard(0)`` over the EP mesh so that DCP
checkpoints reshard between EP layouts. A forward on one rank:

1. the MoE sorts its (token, slot) pairs by expert: [M, D] rows, [E] counts;
2. ``dispatch``: the counts go to every EP rank first (an all-to-all of E int64 per rank), then
   the rows (a variable-size all-to-all); each rank regroups what it received by local expert;
3. the local experts run on their contiguous slices (the same grouped matmul as one process);
4. ``combine``: the inverse regrouping and the reverse all-to-all bring each output back to the
   row it came from; the MoE scatter-adds them onto their tokens with the combine weights.

Autograd flows through both all-to-alls (the backward of one is the other with the splits
swapped). Dropless: every row is sent, whatever the load.

Gradient scale: an EP rank's expert gradient already sums the rows of every rank of its EP
group, so FSDP's average over the expert-sharding mesh (world / ep ranks) alone would leave it
``ep`` times too large (the bug Megatron, DeepSpeed and megablocks each shipped). The local view
of the expert weights scales their gradient by ``1 / ep`` on its way back (``_local_experts``),
so the average is over the whole world (data x context parallel). (FSDP2's ``set_gradient_divide_factor``
would do the same inside the reduce-scatter, but needs ``PREMUL_SUM``, which gloo lacks.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from parallel.comm import CommStats
from parallel.mesh import ParallelMesh


def _send_stats(stats: CommStats, key: str, splits: list[int], rank: int, row_bytes: int) -> None:
    """Record what this rank sends to the other ranks of an all-to-all (its own slice stays)."""
    sent = sum(n for r, n in enumerate(splits) if r != rank)
    stats.add(key, sent * row_bytes, len(splits) - 1)


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all of rows; its backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, stats, key):  # noqa: ANN001
        ctx.splits, ctx.group, ctx.stats, ctx.key = (out_splits, in_splits), group, stats, key
        return _all_to_all(x, out_splits, in_splits, group, stats, key)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        out_splits, in_splits = ctx.splits
        grad_in = _all_to_all(grad, in_splits, out_splits, ctx.group, ctx.stats, ctx.key)
        return grad_in, None, None, None, None, None


def _all_to_all(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup,
    stats: CommStats,
    key: str,
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()  # x may have no rows at all
    _send_stats(stats, key, in_splits, dist.get_rank(group), row_bytes)
    return out


@dataclass
class DispatchHandle:
    """What ``combine`` needs to undo one ``dispatch``."""

    in_splits: list[int]  # rows this rank sent to each EP rank
    out_splits: list[int]  # rows this rank received from each EP rank
    order: torch.Tensor  # [M_local] received row of each local-expert-grouped row


class AllToAllDispatcher:
    """The ``ExpertDispatcher`` of one MoE layer over an EP process group.

    Args:
        group: the EP process group (``ParallelMesh.ep``).
        n_experts: experts of the layer, all ranks together (E).
        stats: where the bytes and messages are counted (key ``ep/all_to_all`` and
            ``ep/splits``).
    """

    def __init__(self, group: dist.ProcessGroup, n_experts: int, stats: CommStats) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if n_experts % self.ep_size:
            raise ValueError(f"n_experts={n_experts} is not a multiple of ep={self.ep_size}")
        self.n_local = n_experts // self.ep_size
        self.stats = stats

    def dispatch(
        self, x_sorted: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """Send each expert's rows to its rank; returns the rows of this rank's experts.

        Args:
            x_sorted: [M, D] rows grouped by global expert.
            counts: [E] rows per global expert.

        Returns:
            x_local [M_local, D] grouped by local expert, counts_local [E_local], and the handle.
        """
        ep, n_local = self.ep_size, self.n_local
        send_counts = counts.to(torch.int64).contiguous()  # [ep * E_local], rank-major
        recv_counts = torch.empty_like(send_counts)
        # split sizes first: each rank learns how many rows of each local expert to expect
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        self.stats.add("ep/splits", send_counts.element_size() * n_local * (ep - 1), ep - 1)
        recv = recv_counts.view(ep, n_local)  # [source rank, local expert]
        in_splits = send_counts.view(ep, n_local).sum(1).tolist()  # host sync: a2a needs sizes
        out_splits = recv.sum(1).tolist()
        x_recv = _AllToAll.apply(
            x_sorted, out_splits, in_splits, self.group, self.stats, "ep/all_to_all"
        )
        order = _regroup_order(recv)
        handle = DispatchHandle(in_splits, out_splits, order)
        return x_recv.index_select(0, order), recv.sum(0), handle

    def combine(self, y_local: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Outputs of the local rows -> [M, D] outputs in the order of ``dispatch``'s input."""
        y_recv = torch.empty_like(y_local).index_copy(0, handle.order, y_local)
        return _AllToAll.apply(
            y_recv, handle.in_splits, handle.out_splits, self.group, self.stats, "ep/all_to_all"
        )


def _regroup_order(recv: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by (source rank, local expert); the experts need (local expert,
    source rank). Returns, for each row of the second order, its index in the first.

    Args:
        recv: [ep, E_local] rows received from each source rank for each local expert.
    """
    lengths = recv.reshape(-1)  # arrival order
    starts = lengths.cumsum(0) - lengths  # where each (source, expert) run starts on arrival
    lengths_t = recv.t().reshape(-1)  # target order: (expert, source)
    starts_t = starts.view(recv.shape).t().reshape(-1)
    run_start = torch.repeat_interleave(starts_t, lengths_t)
    offset_in_run = torch.arange(
        int(lengths_t.sum()), device=recv.device
    ) - torch.repeat_interleave(lengths_t.cumsum(0) - lengths_t, lengths_t)
    return run_start + offset_in_run


class GroupReducer:
    """The ``RankReducer`` of the MoE: sums routing statistics over every routing rank.

    Args:
        group: every rank that routes tokens (``ParallelMesh.routing_group``).
        n_ranks: the ranks whose gradients are averaged (the world: data x context parallel).
        stats: where the bytes and messages are counted (under ``key``).
        key: the ``group/op`` the sums are counted as.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        n_ranks: int,
        stats: CommStats,
        key: str = "routing/all_reduce",
    ) -> None:
        self.group = group
        self.n_ranks = n_ranks
        self.stats = stats
        self.key = key

    @torch.no_grad()
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.group)
        # counted as its payload, one message per call (the algorithm's own traffic is the
        # backend's: a ring sends 2 (n-1)/n of the payload per rank)
        self.stats.add(self.key, out.numel() * out.element_size(), 1)
        return out


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, t, scale):  # noqa: ANN001
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        return grad * ctx.scale, None


def _local_experts(t: torch.Tensor, ep: int) -> torch.Tensor:
    """This EP rank's experts of a weight, its gradient divided by ``ep`` (module docstring)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return ScaleGrad.apply(local, 1.0 / ep)


def apply_expert_parallel(moe_layers: Sequence[nn.Module], mesh: ParallelMesh) -> None:
    """Split each MoE layer's experts over the EP mesh and install its dispatcher; install the
    routing-statistics reducer whenever there is more than one rank. Nothing with one process.

    Args:
        moe_layers: modules with ``experts`` (``w1``, ``w3``, ``w2`` [E, ...] and
            ``shard_view``), ``dispatcher``, ``reducer`` and ``cfg.n_experts`` (``ChunkMoE``).
        mesh: the run's mesh. Call before FSDP2, which then shards each rank's experts over
            ``mesh.expert_fsdp``.
    """
    if mesh.mesh is None:
        return
    # gradients are averaged over every rank (data- and context-parallel)
    reducer = GroupReducer(mesh.routing_group, mesh.dims.world_size, mesh.comm)
    for module in moe_layers:
        module.reducer = reducer
        if mesh.dims.ep == 1:
            continue
        experts = module.experts
        for name in ("w1", "w3", "w2"):
            full = getattr(experts, name)
            sharded = distribute_tensor(full.detach(), mesh.ep, [Shard(0)])
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.shard_view = functools.partial(_local_experts, ep=mesh.dims.ep)
        module.dispatcher = AllToAllDispatcher(mesh.ep.get_group(), module.cfg.n_experts, mesh.comm)
