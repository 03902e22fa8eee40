"""Rows and batches: stored windows (tokens + document starts) -> model inputs.

Shapes: T = seq_len, B = batch size. A batch holds [B, T] ``input_ids`` int64, ``labels`` int64
(next token; -100 on padding and, optionally, across a document boundary), ``seq_idx`` int64
(document index inside the row, non-decreasing; a padded tail is a document of its own) and,
with synthetic sources, ``answer_mask`` bool (positions whose label is an answer token).

Between a DataLoader worker and the main process a batch travels packed: the three integer
arrays as one int32 [3, B, T] tensor (one shared-memory transfer of half the bytes), widened to
int64 views by ``unpack_batch`` in the main process.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.tokens import IGNORE_INDEX

PACKED_KEY = "_packed"


def windows_to_rows(
    windows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, mask_cross_doc: bool
) -> np.ndarray:
    """Stored windows of ``n <= T+1`` tokens -> int32 [3, B, T] (input_ids, labels, seq_idx).

    Args:
        windows: per row, (tokens [n], document starts [k] as positions in the window).
        seq_len: T.
        pad_id: id written into padded input positions.
        mask_cross_doc: label -100 where the next token starts another document (the EOS of one
            document predicting the first token of the next).
    """
    B, T = len(windows), seq_len
    tok = np.full((B, T + 1), pad_id, dtype=np.int32)
    lens = np.empty(B, dtype=np.int64)
    for i, (tokens, _) in enumerate(windows):
        tok[i, : len(tokens)] = tokens
        lens[i] = len(tokens)
    row = np.repeat(np.arange(B), [len(s) for _, s in windows])
    col = np.concatenate([s for _, s in windows]).astype(np.int64) if B else np.zeros(0, np.int64)
    inner = (col > 0) & (col < lens[row])
    row, col = row[inner], col[inner]
    marks = np.zeros((B, T + 1), dtype=np.int32)
    marks[row, col] = 1
    short = np.nonzero(lens < T)[0]
    marks[short, lens[short]] += 1  # padding: a document of its own
    out = np.empty((3, B, T), dtype=np.int32)
    out[0] = tok[:, :T]
    out[1] = tok[:, 1:]
    out[1][np.arange(T)[None, :] >= (lens - 1)[:, None]] = IGNORE_INDEX
    if mask_cross_doc:
        out[1][row, col - 1] = IGNORE_INDEX
    np.cumsum(marks[:, :T], axis=1, out=out[2])
    return out


def unpack_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed transport form -> the public batch dict (int64 tensors, in place of ``_packed``)."""
    # numpy's single-threaded widening: torch's intra-op threads only add contention here
    packed = torch.from_numpy(batch.pop(PACKED_KEY).numpy().astype(np.int64))
    return {"input_ids": packed[0], "labels": packed[1], "seq_idx": packed[2], **batch}
