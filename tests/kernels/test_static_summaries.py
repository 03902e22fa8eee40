"""Static summary shapes for sparse global attention: the same op whatever the packing, one
compiled graph for every batch of a given length, no host sync."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from kernels.attention.ref import (
    build_chunk_summaries,
    document_ids,
    sparse_global_attention,
    sparse_global_attention_dense_ref,
    summary_block_width,
    visible_chunk_summaries,
)
from pretrain.models.common.attention import SparseGlobalAttention
from pretrain.models.common.sequence import resolve_context
from pretrain.models.config import AttentionConfig

T, CHUNK, WINDOW, N_GLOBAL = 96, 8, 16, 3


def _doc_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    doc = document_ids(seq_idx, *seq_idx.shape, seq_idx.device)
    pos = torch.arange(seq_idx.shape[1]).expand_as(doc)
    first = torch.zeros_like(doc).scatter_reduce(1, doc, pos, reduce="amin", include_self=False)
    return pos - first.gather(1, doc)


def _packings(seed: int) -> list[torch.Tensor]:
    """Rows of one document, of many short ones (many partial chunks), and random boundaries."""
    gen = torch.Generator().manual_seed(seed)
    one = torch.zeros(2, T, dtype=torch.long)
    short = (torch.arange(T) // 5).expand(2, T).contiguous()
    rand = (torch.rand(2, T, generator=gen) < 0.05).long().cumsum(1)
    aligned = (torch.arange(T) // 24).expand(2, T).contiguous()  # boundaries on chunk edges
    return [one, short, rand, aligned]


@pytest.mark.parametrize("packing", range(4))
def test_visible_summaries_give_the_op_of_all_summaries(packing: int) -> None:
    seed = 7 + packing
    seq_idx = _packings(seed)[packing]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, T, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    doc_pos = _doc_positions(seq_idx)
    every = build_chunk_summaries(k, v, CHUNK, doc_pos)
    visible = visible_chunk_summaries(k, v, CHUNK, doc_pos)
    assert visible.end.shape == (2, (T - 1) // CHUNK)
    kw = {"window": WINDOW, "n_global": N_GLOBAL, "seq_idx": seq_idx}
    expected = sparse_global_attention_dense_ref(q, k, v, every, **kw)
    torch.testing.assert_close(sparse_global_attention_dense_ref(q, k, v, visible, **kw), expected)
    width = summary_block_width(N_GLOBAL, min(WINDOW, T), CHUNK)
    blocked = sparse_global_attention(q, k, v, visible, summary_width=width, **kw)
    torch.testing.assert_close(blocked, expected)


def test_too_small_a_summary_width_is_caught() -> None:
    seq_idx = torch.zeros(1, T, dtype=torch.long)
    q, k, v = (torch.randn(1, T, 2, 8) for _ in range(3))
    summaries = visible_chunk_summaries(k, v, CHUNK, _doc_positions(seq_idx))
    with pytest.raises(RuntimeError, match="summary_width"):
        sparse_global_attention(
            q, k, v, summaries, window=WINDOW, n_global=N_GLOBAL, summary_width=1
        )


def test_one_graph_serves_every_packing_without_breaks() -> None:
    """The module compiles once (fullgraph: no graph break, no host sync) and is not recompiled
    when the packing, and so the number of chunks, changes from batch to batch."""
    torch.manual_seed(0)
    cfg = AttentionConfig(
        n_heads=4, n_kv_heads=2, window=WINDOW, n_global=N_GLOBAL, summary_chunk=CHUNK
    )
    attn = SparseGlobalAttention(32, cfg)
    counter = CompileCounter()
    compiled = torch.compile(attn, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, T, 32)
    for seq_idx in _packings(3):
        context = resolve_context(x, seq_idx, None)
        torch.testing.assert_close(compiled(x, context=context), attn(x, context=context))
    assert counter.frame_count == 1
