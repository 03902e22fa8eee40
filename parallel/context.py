"""Context parallelism: the collectives of the ranks that split one sequence.

``ContextGroup`` implements the ``SequenceComm`` interface the model's layers call (see
``pretrain/models/common/sequence.py``): an all-gather, an all-reduce and a point-to-point shift
to the next rank(s), each an ``autograd.Function`` whose backward is the mirror collective:

- ``all_gather`` (forward) <-> sum of the gathered gradients over the ranks, own part kept;
- ``all_reduce`` (sum) <-> all-reduce (sum) of the gradients: every rank used the sum;
- ``shift`` (rank r sends to r + hops) <-> the gradient goes back from r + hops to r.

**Ordering.** Collectives in a backward must be entered by every rank, in the same order. The
autograd engine runs a node only if the loss depends on it, and orders independent branches
(the SSM, attention and MoE paths of a block) by the graph, which data can change (a slice that
sees no summary never uses the gathered summaries). So every collective also takes and returns
an *order token*, a scalar threaded through all the collectives of one forward in program order,
and ``tie`` adds the last token (with zero weight) to the model's output: each collective's
backward then runs on every rank, strictly in the reverse of the forward order.

Each call records what this rank sends in ``CommStats`` under ``cp/<key>/<op>``, forward and
backward alike, with the convention of ``parallel.comm``: an all-gather over n ranks sends the
tensor n - 1 times, a (ring) all-reduce sends 2 (n - 1) / n of it, a shift sends it once.
"""

from __future__ import annotations

import copy
import zlib

import torch
import torch.distributed as dist

from parallel.comm import CommStats


class _Mirrored(torch.autograd.Function):
    """A collective whose backward is its mirror collective; threads the order token."""

    @staticmethod
    def forward(ctx, t, token, forward_op, backward_op):  # noqa: ANN001
        ctx.backward_op = backward_op
        return forward_op(t.contiguous()), token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _grad_token):  # noqa: ANN001
        grad_in = ctx.backward_op(grad.contiguous())
        return grad_in, torch.zeros((), device=grad.device), None, None


class ContextGroup:
    """``SequenceComm`` over a context-parallel process group (the ``cp`` dimension of the mesh).

    Args:
        group: the process group of the ranks that split one sequence, in slice order.
        stats: where bytes and messages are counted.
    """

    def __init__(self, group: dist.ProcessGroup, stats: CommStats) -> None:
        self.group = group
        self.stats = stats
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._token: torch.Tensor | None = None
        # NCCL: a group's first P2P call must involve all of its ranks (a shift by more hops
        # than half the group leaves some out); a collective first creates the communicator
        dist.barrier(group=group)

    def all_gather(self, t: torch.Tensor, key: str) -> torch.Tensor:
        key = f"cp/{key}"
        return self._apply(
            t,
            lambda x: self._gather(x, f"{key}/all_gather"),
            lambda g: self._sum(g, f"{key}/all_gather_grad")[self.rank],
        )

    def all_reduce(self, t: torch.Tensor, key: str) -> torch.Tensor:
        key = f"cp/{key}"
        return self._apply(
            t,
            lambda x: self._sum(x, f"{key}/all_reduce"),
            lambda g: self._sum(g, f"{key}/all_reduce_grad"),
        )

    def shift(self, t: torch.Tensor, hops: int, key: str) -> torch.Tensor:
        if hops < 1:
            raise ValueError(f"shift needs hops >= 1, got {hops}")
        key = f"cp/{key}"
        return self._apply(
            t,
            lambda x: self._shift(x, hops, f"{key}/shift"),
            lambda g: self._shift(g, -hops, f"{key}/shift_grad"),
        )

    def pass_on(self, t: torch.Tensor, src: int, key: str) -> torch.Tensor:
        key = f"cp/{key}"
        return self._apply(
            t,
            lambda x: self._pass(x, src, src + 1, f"{key}/pass"),
            lambda g: self._pass(g, src + 1, src, f"{key}/pass_grad"),
        )

    def _apply(self, t: torch.Tensor, forward_op, backward_op) -> torch.Tensor:  # noqa: ANN001
        out, self._token = _Mirrored.apply(t, self._order_token(t), forward_op, backward_op)
        return out

    def begin(self) -> ContextGroup:
        """The same group with a fresh order token, for one forward (one micro-batch): the
        token chain of a forward, and of its activation-checkpoint recomputes, stays apart
        from every other forward's."""
        view = copy.copy(self)
        view._token = None
        return view

    def tie(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus 0 x the last order token (see the module notes); starts a new chain."""
        token, self._token = self._token, None
        if token is None or not torch.is_grad_enabled():
            return out
        never = torch.zeros((), dtype=torch.bool, device=out.device)
        return out + torch.where(never, token, 0.0).to(out.dtype)

    def _order_token(self, like: torch.Tensor) -> torch.Tensor:
        if self._token is None:  # on the activations' device: no host round trips
            self._token = torch.zeros((), device=like.device, requires_grad=torch.is_grad_enabled())
        return self._token

    # ------------------------------------------------------------------ raw collectives

    def _gather(self, t: torch.Tensor, key: str) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        self.stats.add(key, (self.size - 1) * _nbytes(t), self.size - 1)
        return torch.stack(parts)

    def _sum(self, t: torch.Tensor, key: str) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out, group=self.group)
        n = self.size
        self.stats.add(key, round(2 * (n - 1) / n * _nbytes(t)), 2 * (n - 1))
        return out

    def _pass(self, t: torch.Tensor, src: int, dst: int, key: str) -> torch.Tensor:
        """``src`` sends ``t`` to ``dst``, which gets it; ``src`` gets zeros (what it sent is no
        longer its own); every other rank keeps its ``t``. Nothing moves if either is outside."""
        if not (0 <= src < self.size and 0 <= dst < self.size):
            return t
        tag = zlib.crc32(key.encode()) % (1 << 20)
        if self.rank == src:
            dist.send(t, dist.get_global_rank(self.group, dst), group=self.group, tag=tag)
            self.stats.add(key, _nbytes(t), 1)
            return torch.zeros_like(t)
        if self.rank == dst:
            out = torch.empty_like(t)
            dist.recv(out, dist.get_global_rank(self.group, src), group=self.group, tag=tag)
            return out
        return t

    def _shift(self, t: torch.Tensor, hops: int, key: str) -> torch.Tensor:
        """Send ``t`` to rank ``rank + hops`` and receive from ``rank - hops`` (hops may be < 0)."""
        dst, src = self.rank + hops, self.rank - hops
        out = torch.zeros_like(t)
        # one tag per kind of traffic and direction: a message can only meet its own receive
        tag = zlib.crc32(key.encode()) % (1 << 20)
        ops = []
        if 0 <= dst < self.size:
            peer = dist.get_global_rank(self.group, dst)
            ops.append(dist.P2POp(dist.isend, t, peer, self.group, tag))
        if 0 <= src < self.size:
            peer = dist.get_global_rank(self.group, src)
            ops.append(dist.P2POp(dist.irecv, out, peer, self.group, tag))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if 0 <= dst < self.size:
            self.stats.add(key, _nbytes(t), 1)
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
