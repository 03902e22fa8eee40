"""Cache-sized blocks for the bandwidth-bound elementwise chains (norms, the short conv) on CPU.

A chain of k elementwise ops over a whole [T, D] activation streams it through memory k times;
run over blocks of rows, each block stays in cache from the chain's first op to its last. On a
GPU a block is the whole tensor: a few large kernels, and the graph torch.compile traces stays
the one it was.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Bytes of one [rows, width] block of one tensor. Measured on the 2-core test machine (the conv's
# forward + backward at 8K tokens, 1 thread, CPU time; docs/performance.md): whole tensors 1.0,
# 2 MiB blocks 0.86, 1 MiB 0.81, 256 KiB 0.68. Smaller blocks mean more ops, each a parallel
# region whose start and barrier cost microseconds (much more on a machine whose cores are
# shared with other processes), so 1 MiB: most of the gain, 4x fewer ops than 256 KiB, and
# every op still splits into several 32K-element grains for the intra-op threads.
CPU_BLOCK_BYTES = 2**20


def block_rows(rows: int, row_bytes: int, device: torch.device, minimum: int = 1) -> int:
    """Rows per block: about ``CPU_BLOCK_BYTES`` of ``row_bytes``-byte rows on CPU, every row
    elsewhere; never fewer than ``minimum``."""
    if device.type != "cpu":
        return max(rows, minimum)
    return max(minimum, CPU_BLOCK_BYTES // max(row_bytes, 1))


def row_slices(rows: int, block: int) -> Iterator[slice]:
    """``slice``s of ``block`` rows (the last one shorter) covering ``range(rows)``."""
    for start in range(0, rows, block):
        yield slice(start, min(start + block, rows))
