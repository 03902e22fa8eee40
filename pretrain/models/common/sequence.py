"""The sequence context every layer's forward receives: which slice of which rows it computes.

With one process (or ``cp = 1``) the slice is the whole row. Under context parallelism the ``cp``
ranks of a group read the same rows of length L and each computes the contiguous slice
``[offset, offset + T)`` of every row (T = L / cp). Layers that mix along time (the SSM scan and
conv, attention, the workspace, MoE routing chunks) then need what lies before their slice; they
get it through ``comm``, a small interface that ``parallel.context`` implements (model code
imports nothing from ``torch.distributed``). Per-token layers (FFN, PKM) ignore the context.

Positions are global: ``doc_pos`` counts from each document's start wherever that start lies, so
RoPE angles and the chunk numbering of MoE routing units, attention summaries and workspace
segments are those of the whole row. (The SSD scan's chunks are only a way of computing it: each
slice chunks from its own start, and the state passing makes the result that of the whole row.)
Document ids of the whole row (``row_doc``, small integers) are known to every rank, so each rank
knows the layout of every slice without communicating; only activations are exchanged.

Shape legend: B batch, T slice length, L row length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kernels.attention.ref import chunk_layout
from kernels.ssd.ref import document_ids
from pretrain.models.common.documents import positions_in_document


class SequenceComm(Protocol):
    """Collectives over the ranks that split one sequence (all differentiable; ``key`` names the
    traffic for the communication counters)."""

    rank: int  # this rank's slice index, 0 .. size - 1
    size: int  # ranks that split the sequence

    def all_gather(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """[*S] -> [size, *S]: every rank's ``t``, stacked in slice order."""
        ...

    def all_reduce(self, t: torch.Tensor, key: str) -> torch.Tensor:
        """The sum of ``t`` over the ranks."""
        ...

    def shift(self, t: torch.Tensor, hops: int, key: str) -> torch.Tensor:
        """``t`` of rank ``rank - hops`` (zeros on ranks below ``hops``): point to point."""
        ...

    def begin(self) -> SequenceComm:
        """These collectives for one forward (``SequenceContext.of_slice`` calls it)."""
        ...

    def pass_on(self, t: torch.Tensor, src: int, key: str) -> torch.Tensor:
        """Rank ``src`` hands ``t`` to rank ``src + 1`` (which returns it); ``src`` returns zeros,
        every other rank its own ``t``: one message, for computations that run rank by rank."""
        ...

    def tie(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` made to depend (with zero weight) on every collective of this forward, so
        that each one's backward runs on every rank, in order; the model calls it on its
        output once per forward."""
        ...


@dataclass
class SequenceContext:
    """Where this forward's slice sits in its rows.

    Attributes:
        seq_idx: [B, T] document ids of the slice's positions, or None (one document per row and
            no split).
        doc_pos: [B, T] int64 position of each token inside its document (global).
        offset: global position of the slice's first token.
        length: L, the full row length (T when not split).
        row_doc: [B, L] canonical document ids (0, 1, ... per row) of the whole row; split only.
        row_doc_pos: [B, L] position-in-document of the whole row; split only.
        comm: the collectives of the ranks that split the row; None when not split.
    """

    seq_idx: torch.Tensor | None
    doc_pos: torch.Tensor
    offset: int = 0
    length: int = 0
    row_doc: torch.Tensor | None = None
    row_doc_pos: torch.Tensor | None = None
    comm: SequenceComm | None = None
    # row_chunk_layout per chunk size: every attention layer of a forward shares one
    _chunk_layouts: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    @property
    def split(self) -> bool:
        """True when other ranks hold other slices of these rows."""
        return self.comm is not None and self.comm.size > 1

    @property
    def slice_len(self) -> int:
        return self.doc_pos.shape[1]

    @property
    def continues(self) -> torch.Tensor:
        """[B] bool: the slice's first token continues a document begun on an earlier rank."""
        return self.doc_pos[:, 0] > 0

    def first_document(self) -> torch.Tensor:
        """[B, T] bool: positions of the document that continues from an earlier rank (none in
        rows whose slice starts a document)."""
        doc = self.doc_ids()
        return (doc == doc[:, :1]) & self.continues[:, None]

    def doc_ids(self) -> torch.Tensor:
        """[B, T] document ids of the slice in the row's canonical numbering."""
        if self.row_doc is not None:
            return self.seq_idx  # the slice of row_doc
        b, t = self.doc_pos.shape
        if self.seq_idx is None:
            return torch.zeros(b, t, dtype=torch.long, device=self.doc_pos.device)
        return document_ids(self.seq_idx)

    def row_chunk_layout(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``chunk_layout`` of the whole row (split only): chunk index [B, L] and each chunk's
        start and end [B, S]; computed once per chunk size and forward."""
        if chunk not in self._chunk_layouts:
            self._chunk_layouts[chunk] = chunk_layout(self.row_doc_pos, chunk)
        return self._chunk_layouts[chunk]

    def row_slice(self, t: torch.Tensor) -> torch.Tensor:
        """This slice's columns of a [B, L, ...] row tensor."""
        return t[:, self.offset : self.offset + self.slice_len]

    @classmethod
    def whole(
        cls, seq_idx: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
    ) -> SequenceContext:
        """The context of unsplit rows (one process, or cp = 1)."""
        doc_pos = positions_in_document(seq_idx, batch, seq_len, device)
        return cls(seq_idx=seq_idx, doc_pos=doc_pos, offset=0, length=seq_len)

    @classmethod
    def of_slice(
        cls,
        row_seq_idx: torch.Tensor | None,
        batch: int,
        length: int,
        comm: SequenceComm,
        device: torch.device,
    ) -> SequenceContext:
        """The context of rank ``comm.rank``'s slice of rows of ``length`` tokens.

        Args:
            row_seq_idx: [B, L] document index of the whole rows, or None (one document per row).
            batch: B.
            length: L; ``comm.size`` must divide it.
            comm: the collectives of the context-parallel group.
            device: where the position tensors live.
        """
        if length % comm.size:
            raise ValueError(f"sequence length {length} is not a multiple of cp={comm.size}")
        t = length // comm.size
        offset = comm.rank * t
        if row_seq_idx is None:
            row_doc = torch.zeros(batch, length, dtype=torch.long, device=device)
        else:
            row_doc = document_ids(row_seq_idx.to(device))
        row_doc_pos = positions_in_document(row_doc, batch, length, device)
        return cls(
            seq_idx=row_doc[:, offset : offset + t],
            doc_pos=row_doc_pos[:, offset : offset + t],
            offset=offset,
            length=length,
            row_doc=row_doc,
            row_doc_pos=row_doc_pos,
            comm=comm.begin(),
        )


def resolve_context(
    x: torch.Tensor, seq_idx: torch.Tensor | None, context: SequenceContext | None
) -> SequenceContext:
    """``context``, or the whole-row context of ``x`` [B, T, ...] and ``seq_idx`` when None."""
    if context is not None:
        return context
    return SequenceContext.whole(seq_idx, x.shape[0], x.shape[1], x.device)
