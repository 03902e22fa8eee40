"""Sharded product-key memory: each PKM value table split by columns over a group of ranks.

Every rank of the shard group holds all R rows and ``Dv / n`` of the columns (as Meta's memory
layers do), as a DTensor ``Shard(1)`` so that DCP checkpoints reshard between shard counts and
AdamW's state is sharded like the table. The table stays out of FSDP2 (no rank ever all-gathers
it). Columns rather than rows (figures in docs/parallelism.md): with rows, each rank's partial
bag is a full-width [n N, Dv] that has to be summed across the group (n times the bytes of the
column exchange below), and the work follows the key usage, which is uneven.

A forward on rank r of n, with N tokens of ``H k`` reads each:
1. all-gather every rank's rows and weights: [n N, H k] each (int32 and fp32);
2. the local weighted bag of those reads over this rank's columns: [n N, Dv / n] (the Triton
   bag on GPU, ``F.embedding_bag`` on CPU: ``kernels.pkm.op.pkm_lookup``);
3. an all-to-all gives block j of those rows to rank j, which puts the n column blocks of its
   own tokens side by side: [N, Dv].
The backward mirrors it: the reverse all-to-all brings the column blocks of the output
gradient back; the local bag's backward gives this rank's value gradient (on its shard: an
[R, Dv / n] buffer, never [R, Dv]) and every read's partial weight gradient over its columns,
which a reduce-scatter sums and returns to the read's rank.

Gradient scale: a rank's value gradient already sums the reads of the whole shard group, while
the other parameters are averaged over every rank; so the shard's gradient is divided by the
world size and summed over the ranks that hold the same shard (``replicas``: every mesh
dimension the table is not sharded over), which leaves the same average over the world. That
sum runs once per step, on the gradient accumulated over the step's micro-batches (like FSDP2's
reduce-scatter; ``FSDPEngine`` sets ``sync_replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kernels.pkm.op import pkm_lookup
from parallel.comm import CommStats
from parallel.expert import GroupReducer, ScaleGrad
from parallel.mesh import ParallelMesh

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only those
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, key: str):
    n = dist.get_world_size(group)
    out = t.new_empty((n * t.shape[0], *t.shape[1:]))
    _all_gather(out, t.contiguous(), group=group)
    stats.add(key, (n - 1) * _nbytes(t), n - 1)
    return out


class _GatherReads(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradient over the group and keeps this
    rank's rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, t, group, stats):  # noqa: ANN001
        ctx.group, ctx.stats = group, stats
        return _gather_rows(t, group, stats, "pkm/all_gather")

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        n = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // n, *grad.shape[1:]))
        _reduce_scatter(out, grad, group=ctx.group)
        ctx.stats.add("pkm/reduce_scatter", (n - 1) * _nbytes(out), n - 1)
        return out, None, None


def _exchange(t: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, key: str):
    """Equal-block all-to-all along dim 0: block j of ``t`` goes to rank j."""
    n = dist.get_world_size(group)
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t.contiguous(), group=group)
    stats.add(key, (n - 1) * _nbytes(t) // n, n - 1)
    return out


class _ExchangeColumns(torch.autograd.Function):
    """[n N, Dv / n] partial bags of every rank's tokens over this rank's columns -> [N, Dv]
    full rows of this rank's tokens; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, part, group, stats):  # noqa: ANN001
        ctx.group, ctx.stats = group, stats
        n = dist.get_world_size(group)
        cols = _exchange(part, group, stats, "pkm/all_to_all")  # block j: columns of rank j
        ctx.shape = cols.shape
        return cols.view(n, -1, cols.shape[1]).permute(1, 0, 2).reshape(-1, n * cols.shape[1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        n = dist.get_world_size(ctx.group)
        blocks = grad.reshape(grad.shape[0], n, -1).permute(1, 0, 2).reshape(ctx.shape)
        return _exchange(blocks, ctx.group, ctx.stats, "pkm/all_to_all_grad"), None, None


class ShardedBagLookup:
    """The PKM ``ValueLookup`` over a column-sharded table (module docstring).

    Every rank of ``group`` must call it with the same number of reads (the trainer's batches
    have one shape on every rank).

    Args:
        group: the ranks that split the table's columns.
        replicas: the ranks that hold the same shard (their gradients are summed), or None.
        world_size: every rank that averages gradients.
        stats: where the bytes and messages are counted (keys ``pkm/...``).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        replicas: dist.ProcessGroup | None,
        world_size: int,
        stats: CommStats,
    ) -> None:
        self.group = group
        self.replicas = replicas
        self.world_size = world_size
        self.stats = stats
        # the engine clears it on micro-batches before the last one of a step (as FSDP2 skips
        # its reduce-scatter there): the replicas then sum the accumulated gradient once
        self.sync_replicas = True

    def track(self, table: nn.Parameter) -> None:
        """Sum ``table``'s accumulated gradient over the replicas after each backward that
        syncs (a post-accumulate hook: the sum covers every micro-batch of the step)."""
        if self.replicas is not None:
            table.register_post_accumulate_grad_hook(self._sum_over_replicas)

    @torch.no_grad()
    def _sum_over_replicas(self, table: nn.Parameter) -> None:
        if not self.sync_replicas:
            return
        grad = table.grad.to_local() if isinstance(table.grad, DTensor) else table.grad
        dist.all_reduce(grad, group=self.replicas)
        n = dist.get_world_size(self.replicas)
        self.stats.add("pkm/replica_all_reduce", round(2 * (n - 1) / n * _nbytes(grad)), 1)

    @torch.compiler.disable  # collectives inside autograd functions: left out of the graph
    def __call__(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        backend: str,
    ) -> torch.Tensor:
        """``out[t] = sum_j weights[t, j] * values[indices[t, j]]`` for this rank's reads.

        Args:
            values: [R, Dv] DTensor, ``Shard(1)`` over the group.
            indices: [N, H k] int64 rows; weights: [N, H k] fp32.
            backend: the local bag's kernel backend (``torch`` | ``triton``).

        Returns:
            [N, Dv] in the table's dtype.
        """
        local = values.to_local() if isinstance(values, DTensor) else values
        local = ScaleGrad.apply(local, 1.0 / self.world_size)  # module docstring
        # rows travel and stay int32 (a table has fewer than 2**31 rows; both bags take int32):
        # 4 bytes a read, not 8, on the wire and in the gathered [n N, H k]
        rows = _gather_rows(indices.to(torch.int32), self.group, self.stats, "pkm/all_gather")
        part = pkm_lookup(local, rows, _GatherReads.apply(weights, self.group, self.stats), backend)
        return _ExchangeColumns.apply(part, self.group, self.stats)


def apply_pkm_parallel(
    pkm_layers: Sequence[nn.Module], mesh: ParallelMesh, over: str
) -> set[nn.Parameter]:
    """Install each PKM layer's key-usage reducer (over every rank) and split its value table by
    columns over the mesh dimensions ``over`` names, with its sharded lookup. Nothing with one
    process; no split with ``over`` = ``none`` or a single rank to split over.

    Call before FSDP2 and pass the returned parameters as its ``ignored_params``.

    Args:
        pkm_layers: ``ProductKeyMemory`` modules (``values.weight`` [R, Dv], ``lookup``).
        mesh: the run's mesh.
        over: ``fsdp`` | ``dp_shard`` | ``efsdp`` | ``ep`` | ``cp`` | ``none``
            (``parallel.dims.PKM_SHARD_DIMS``).

    Returns:
        The sharded value tables.

    Raises:
        ValueError: a table's value size is not a multiple of the shard count.
    """
    if mesh.mesh is None or not pkm_layers:
        return set()
    usage = GroupReducer(mesh.routing_group, mesh.dims.world_size, mesh.comm, "pkm/usage")
    for module in pkm_layers:
        module.reducer = usage
    table_mesh = mesh.table_mesh(over)
    if table_mesh is None:
        return set()
    n = table_mesh.size()
    replicas = mesh.table_replicas(over)
    lookup = ShardedBagLookup(
        table_mesh.get_group(),
        replicas.get_group() if replicas is not None else None,
        mesh.dims.world_size,
        mesh.comm,
    )
    sharded = set()
    for module in pkm_layers:
        full = module.values.weight
        if full.shape[1] % n:
            raise ValueError(
                f"PKM value size {full.shape[1]} is not a multiple of the {n} ranks of"
                f" parallel.pkm_shard={over}"
            )
        table = nn.Parameter(
            distribute_tensor(full.detach(), table_mesh, [Shard(1)]),
            requires_grad=full.requires_grad,
        )
        module.values.weight = table
        module.lookup = lookup
        lookup.track(table)
        sharded.add(table)
    return sharded


def sharded_lookups(model: nn.Module) -> list[ShardedBagLookup]:
    """The distinct sharded lookups installed on ``model``'s PKM layers."""
    found = {
        id(m.lookup): m.lookup
        for m in model.modules()
        if isinstance(m.__dict__.get("lookup"), ShardedBagLookup)
    }
    return list(found.values())
