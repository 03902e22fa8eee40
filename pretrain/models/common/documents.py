"""Document boundaries inside packed sequences.

``seq_idx`` [B, T] (int) numbers the documents of each packed row; it is non-decreasing along T
and a new value starts a new document. ``None`` everywhere means "one document per row".
"""

from __future__ import annotations

import torch


def positions_in_document(
    seq_idx: torch.Tensor | None, batch: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Position of each token inside its own document: [B, T] (restarts at 0 at each boundary)."""
    pos = torch.arange(seq_len, device=device).expand(batch, seq_len)
    if seq_idx is None:
        return pos
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    # index of the latest document start at or before t
    start_pos = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return pos - start_pos


def seq_idx_from_boundaries(doc_starts: torch.Tensor) -> torch.Tensor:
    """[B, T] bool mask of document starts -> [B, T] document index (``cumsum``)."""
    return doc_starts.long().cumsum(dim=1)
