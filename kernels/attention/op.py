"""Sparse global attention with a choice of backend: ``torch``, ``flex`` or ``flash_attn``.

Shape legend: b batch, T time, H query heads, Hkv key/value heads, K head dim.

Every backend computes the op of ``kernels/attention/ref.py`` (a local causal window plus the
``n_global`` most recent summaries of completed chunks of the query's document):

* ``torch``: the blocked PyTorch path (CPU and GPU, forward and backward), the reference.
* ``flex``: FlexAttention with a block-sparse mask over keys ``[tokens, summaries]``
  (``kernels/attention/flex.py``), compiled on CUDA. On CPU it runs eagerly, forward only; the
  tests compare that forward with the reference.
* ``flash_attn``: flash-attn's windowed varlen kernel for the local part and the blocked summary
  part merged by log-sum-exp (``kernels/attention/flash.py``). CUDA only; on CPU its layout, merge
  and LSE gradient are tested with a dense stand-in for the flash kernel.
"""

from __future__ import annotations

import torch

from kernels.attention.ref import ChunkSummaries
from kernels.attention.ref import sparse_global_attention as _sparse_global_attention_blocked


def sparse_global_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    summaries: ChunkSummaries | None,
    *,
    window: int,
    n_global: int,
    seq_idx: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "torch",
    summary_width: int | None = None,
) -> torch.Tensor:
    """Sparse global attention on the chosen backend.

    Args:
        q: [b, T, H, K] queries.
        k, v: [b, T, Hkv, K] keys and values (Hkv divides H).
        summaries: summary tokens sorted by ``end`` per row, or ``None`` (local attention only).
        window: local causal window in tokens, the query included.
        n_global: at most this many summaries per query (the most recent candidates).
        seq_idx: [b, T] document numbers of packed rows, ``None``: one document per row.
        scale: score scale, default ``K ** -0.5``.
        backend: ``torch`` | ``flex`` | ``flash_attn``.
        summary_width: for the blocked ``torch`` path, the static number of summaries a query
            block gathers (``kernels.attention.ref.summary_block_width``); None measures it.

    Returns:
        [b, T, H, K] in q's dtype.

    Raises:
        BackendUnavailableError: the backend's package cannot be imported.
        ValueError: unknown backend.
    """
    kwargs = {"window": window, "n_global": n_global, "seq_idx": seq_idx, "scale": scale}
    if backend == "torch":
        return _sparse_global_attention_blocked(
            q, k, v, summaries, summary_width=summary_width, **kwargs
        )
    if backend == "flex":
        from kernels.attention.flex import sparse_global_attention_flex

        return sparse_global_attention_flex(q, k, v, summaries, **kwargs)
    if backend == "flash_attn":
        from kernels.attention.flash import sparse_global_attention_flash

        return sparse_global_attention_flash(q, k, v, summaries, **kwargs)
    raise ValueError(f"unknown attention backend '{backend}'; known: torch, flex, flash_attn")


def chunk_boundary_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_pos: torch.Tensor,
    seq_idx: torch.Tensor | None = None,
    *,
    chunk: int,
    offset: int = 0,
    leading: int,
    scale: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Attamba's chunk-boundary attention (``kernels/attention/boundary.py``) on a backend:
    ``torch`` (blocked, CPU and GPU, the reference) or ``flex`` (FlexAttention, compiled on
    CUDA; eager forward only on CPU). Arguments as in ``boundary_attention``.

    Raises:
        ValueError: unknown backend.
    """
    kwargs = {"chunk": chunk, "offset": offset, "leading": leading, "scale": scale}
    if backend == "torch":
        from kernels.attention.boundary import boundary_attention

        return boundary_attention(q, k, v, doc_pos, seq_idx, **kwargs)
    if backend == "flex":
        from kernels.attention.boundary_flex import boundary_attention_flex

        return boundary_attention_flex(q, k, v, doc_pos, seq_idx, **kwargs)
    raise ValueError(f"unknown boundary_attention backend '{backend}'; known: torch, flex")
