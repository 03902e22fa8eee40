"""Cutting each batch into this rank's context-parallel slice, with its ``SequenceContext``.

Under context parallelism the ranks of a CP group read the same rows (the reader shards by
data-parallel rank only); each keeps the columns ``[offset, offset + L / cp)`` of every
per-position tensor (tokens, labels, answer masks) and builds the context that tells the model
where the slice sits. Without CP the batch goes through unchanged, with no context.
"""

from __future__ import annotations

import torch

from pretrain.models.common.sequence import SequenceComm, SequenceContext


class ContextSplit:
    """Callable ``batch -> (local batch, context or None)``.

    Args:
        comm: the context-parallel group's collectives, or None (no context parallelism).
    """

    def __init__(self, comm: SequenceComm | None) -> None:
        self.comm = comm if comm is not None and comm.size > 1 else None

    def __call__(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], SequenceContext | None]:
        if self.comm is None:
            return batch, None
        ids = batch["input_ids"]
        rows, length = ids.shape
        context = SequenceContext.of_slice(
            batch.get("seq_idx"), rows, length, self.comm, ids.device
        )
        cols = slice(context.offset, context.offset + context.slice_len)
        local = {
            key: value[:, cols] if value.dim() >= 2 and value.shape[:2] == (rows, length) else value
            for key, value in batch.items()
        }
        return local, context
