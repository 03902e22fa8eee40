"""Sparse global attention: blocked CPU algorithm vs the dense definition, and its cost."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.attention import (
    ChunkSummaries,
    build_chunk_summaries,
    document_ids,
    sparse_global_attention,
    sparse_global_attention_dense_ref,
    summary_visibility_dense,
)

F64 = torch.float64
# fp64 agreement is ~1e-15 in a quiet process; under CPU contention MKL switches code paths and
# was seen to move results by ~2e-9 (never with MKL_CBWR=COMPATIBLE). Real bugs show as >= 1e-3.
TOL = dict(rtol=1e-7, atol=1e-7)


def _doc_positions(seq_idx: torch.Tensor | None, b: int, T: int) -> torch.Tensor:
    pos = torch.arange(T).expand(b, T)
    if seq_idx is None:
        return pos
    doc = document_ids(seq_idx, b, T, seq_idx.device)
    first = torch.full((b, int(doc.max()) + 1), T, dtype=torch.long).scatter_reduce(
        1, doc, pos, "amin"
    )
    return pos - first.gather(1, doc)


def _packed_seq_idx(b: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Random packing: 1-4 documents per row, any lengths (ids need not start at 0)."""
    rows = []
    for _ in range(b):
        cuts = (
            torch.randperm(T - 1, generator=gen)[: int(torch.randint(0, 4, (1,), generator=gen))]
            + 1
        )
        starts = torch.zeros(T, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0) + 7)
    return torch.stack(rows)


def _inputs(b, T, H, Hkv, K, gen, requires_grad=False):
    q = torch.randn(b, T, H, K, dtype=F64, generator=gen)
    k = torch.randn(b, T, Hkv, K, dtype=F64, generator=gen)
    v = torch.randn(b, T, Hkv, K, dtype=F64, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# (b, T, H, Hkv, K, window, chunk, n_global, packed)
CASES = [
    (2, 48, 4, 4, 8, 8, 4, 3, False),  # multiples of window and chunk
    (2, 53, 4, 2, 8, 8, 5, 2, False),  # ragged T, GQA
    (1, 61, 6, 2, 4, 7, 3, 50, True),  # n_global larger than the number of chunks, packed
    (2, 45, 2, 1, 8, 6, 4, 0, True),  # n_global = 0, packed, MQA
    (2, 30, 2, 2, 4, 64, 4, 4, False),  # window >= T: plain causal attention
    (3, 70, 4, 2, 8, 9, 4, 3, True),  # packed, ragged everything
    (1, 17, 2, 1, 4, 1, 2, 2, True),  # window 1: each query sees itself and summaries
    (2, 37, 4, 2, 8, 40, 4, 3, True),  # T < window (one ragged block), packed, GQA
]


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_reference_forward_and_backward(case):
    b, T, H, Hkv, K, window, chunk, n_global, packed = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    seq_idx = _packed_seq_idx(b, T, gen) if packed else None
    q, k, v = _inputs(b, T, H, Hkv, K, gen, requires_grad=True)
    summ = build_chunk_summaries(k.detach(), v.detach(), chunk, _doc_positions(seq_idx, b, T))
    sk = summ.k.clone().requires_grad_(True)
    sv = summ.v.clone().requires_grad_(True)
    summ = summ._replace(k=sk, v=sv)
    kw = dict(window=window, n_global=n_global, seq_idx=seq_idx)

    out = sparse_global_attention(q, k, v, summ, **kw)
    ref = sparse_global_attention_dense_ref(q, k, v, summ, **kw)
    torch.testing.assert_close(out, ref, **TOL)

    grad_out = torch.randn(out.shape, dtype=F64, generator=gen)
    leaves = (q, k, v, sk, sv)
    kw_grad = dict(allow_unused=True, materialize_grads=True)  # n_global = 0 uses no summary
    grads = torch.autograd.grad(out, leaves, grad_out, **kw_grad)
    grads_ref = torch.autograd.grad(ref, leaves, grad_out, **kw_grad)
    for name, g, g_ref in zip("q k v summary_k summary_v".split(), grads, grads_ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, g_ref, **TOL, msg=name)

    visible = summary_visibility_dense(
        summ, document_ids(seq_idx, b, T, q.device), window, n_global
    )
    if n_global > 0 and window + chunk < T // 2:
        assert visible.any(), "case meant to exercise the summary path sees no summary"
        assert grads[3].abs().sum() > 0
    else:
        assert not grads[3].any()


def _visibility_by_loops(summ: ChunkSummaries, doc: torch.Tensor, window: int, n_global: int):
    """The rule written out literally, one query at a time."""
    b, T = doc.shape
    S = summ.end.shape[1]
    vis = torch.zeros(b, T, S, dtype=torch.bool)
    for r in range(b):
        for t in range(T):
            cands = []
            for j in range(S):
                start, end = int(summ.start[r, j]), int(summ.end[r, j])
                if end >= T or end > t - window:
                    continue
                if doc[r, start] == doc[r, t] and doc[r, end] == doc[r, t]:
                    cands.append(j)
            for j in cands[max(0, len(cands) - n_global) :] if n_global else []:
                vis[r, t, j] = True
    return vis


@pytest.mark.parametrize("doc_aligned", [True, False])
def test_visibility_rule_against_loops(doc_aligned):
    """Row-aligned chunks cross document boundaries: those must be dropped, not counted."""
    gen = torch.Generator().manual_seed(3)
    b, T, window, chunk, n_global = 2, 40, 5, 4, 3
    seq_idx = _packed_seq_idx(b, T, gen)
    seq_idx[0] = torch.tensor([0] * 13 + [1] * 20 + [2] * 7)  # boundaries off the chunk grid
    k = torch.randn(b, T, 1, 2, dtype=F64, generator=gen)
    doc_pos = _doc_positions(seq_idx, b, T) if doc_aligned else None
    summ = build_chunk_summaries(k, k, chunk, doc_pos)
    doc = document_ids(seq_idx, b, T, k.device)
    vis = summary_visibility_dense(summ, doc, window, n_global)
    assert torch.equal(vis, _visibility_by_loops(summ, doc, window, n_global))
    assert vis.any()
    # nothing visible ever starts in another document or ends inside the window
    r, t, j = vis.nonzero(as_tuple=True)
    assert torch.equal(doc[r, summ.start[r, j]], doc[r, t])
    assert (summ.end[r, j] <= t - window).all()

    q = torch.randn(b, T, 2, 2, dtype=F64, generator=gen)
    kw = dict(window=window, n_global=n_global, seq_idx=seq_idx)
    torch.testing.assert_close(
        sparse_global_attention(q, k, k, summ, **kw),
        sparse_global_attention_dense_ref(q, k, k, summ, **kw),
        **TOL,
    )


def test_chunk_summaries_are_document_aligned_means():
    gen = torch.Generator().manual_seed(5)
    lengths, chunk = [13, 20, 7], 4
    T = sum(lengths)
    seq_idx = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    k = torch.randn(1, T, 2, 3, dtype=F64, generator=gen)
    v = torch.randn(1, T, 2, 3, dtype=F64, generator=gen)
    summ = build_chunk_summaries(k, v, chunk, _doc_positions(seq_idx, 1, T))
    offset, j = 0, 0
    for n in lengths:
        alone = build_chunk_summaries(k[:, offset : offset + n], v[:, offset : offset + n], chunk)
        for c in range(alone.end.shape[1]):
            lo, hi = c * chunk, min((c + 1) * chunk, n)
            torch.testing.assert_close(alone.k[0, c], k[0, offset + lo : offset + hi].mean(0))
            torch.testing.assert_close(summ.k[0, j], alone.k[0, c])
            torch.testing.assert_close(summ.v[0, j], alone.v[0, c])
            assert (int(summ.start[0, j]), int(summ.end[0, j])) == (offset + lo, offset + hi - 1)
            j += 1
        offset += n
    assert j == summ.end.shape[1]


def test_padded_summaries_and_errors():
    gen = torch.Generator().manual_seed(6)
    q, k, v = _inputs(2, 20, 2, 1, 4, gen)
    seq_idx = torch.tensor([[0] * 20, [0] * 3 + [1] * 17])  # rows with different chunk counts
    summ = build_chunk_summaries(k, v, 4, _doc_positions(seq_idx, 2, 20))
    assert summ.end.shape[1] == 6 and int(summ.end[0, -1]) == 20  # row 0 has 5 chunks: 1 pad
    kw = dict(window=3, n_global=2, seq_idx=seq_idx)
    torch.testing.assert_close(
        sparse_global_attention(q, k, v, summ, **kw),
        sparse_global_attention_dense_ref(q, k, v, summ, **kw),
        **TOL,
    )
    # a device-side assert (no host sync): RuntimeError on CPU, a device assert on CUDA
    with pytest.raises(RuntimeError, match="sorted"):
        sparse_global_attention(q, k, v, summ._replace(end=summ.end.flip(1)), **kw)
    with pytest.raises(ValueError, match="divide"):
        sparse_global_attention(q, k.expand(-1, -1, 3, -1), v.expand(-1, -1, 3, -1), None, **kw)


class _OpNames(TorchDispatchMode):
    """Records the name of every aten op that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def test_cpu_path_runs_the_flash_kernel_forward_and_backward():
    """A boolean/additive mask or GQA must not send SDPA to its math fallback (which builds the
    scores with bmm and a softmax, and saves them for the backward)."""
    gen = torch.Generator().manual_seed(8)
    b, T, window, chunk = 2, 45, 8, 4
    q, k, v = (t.float().requires_grad_(True) for t in _inputs(b, T, 4, 2, 8, gen))
    seq_idx = _packed_seq_idx(b, T, gen)
    summ = build_chunk_summaries(k, v, chunk, _doc_positions(seq_idx, b, T))
    with _OpNames() as mode:
        out = sparse_global_attention(q, k, v, summ, window=window, n_global=3, seq_idx=seq_idx)
        out.sum().backward()
    assert "_scaled_dot_product_flash_attention_for_cpu.default" in mode.names
    assert "_scaled_dot_product_flash_attention_for_cpu_backward.default" in mode.names
    assert not {name for name in mode.names if "softmax" in name or "bmm" in name}, mode.names


def test_cpu_training_keeps_block_gathers_and_mask_out_of_backward():
    """Equal head counts in training on CPU: the flash kernels run through
    ``attend_rebuilding_inputs``, so autograd keeps k, v, the summaries and a boolean
    visibility, not each block's gathered keys/values or its additive fp32 mask; the gradients
    are the dense reference's."""
    gen = torch.Generator().manual_seed(9)
    b, T, H, K, window, chunk = 2, 45, 2, 8, 8, 4
    q, k, v = (t.float().requires_grad_(True) for t in _inputs(b, T, H, H, K, gen))
    seq_idx = _packed_seq_idx(b, T, gen)
    summ = build_chunk_summaries(k, v, chunk, _doc_positions(seq_idx, b, T))
    saved: list[torch.Tensor] = []
    with _OpNames() as mode:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = sparse_global_attention(q, k, v, summ, window=window, n_global=3, seq_idx=seq_idx)
        out.sum().backward()
    assert "_scaled_dot_product_flash_attention_for_cpu_backward.default" in mode.names
    n_blocks = -(-T // window)
    # per block [b*n, ...]: q and the output are [.., W, K]; gathers [.., L, K], masks [.., W, L]
    per_block = [t for t in saved if t.dim() == 4 and t.shape[0] == b * n_blocks]
    kept = [t for t in per_block if t.is_floating_point() and t.shape[-2:] != (window, K)]
    assert not kept, [tuple(t.shape) for t in kept]
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    summ_ref = build_chunk_summaries(leaves[1], leaves[2], chunk, _doc_positions(seq_idx, b, T))
    ref = sparse_global_attention_dense_ref(
        *leaves, summ_ref, window=window, n_global=3, seq_idx=seq_idx
    )
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) behind any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def _largest_in_forward_backward(fn, T: int, window: int, chunk: int, n_global: int) -> int:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (t.float() for t in _inputs(1, T, 2, 1, 8, gen))
    q.requires_grad_(True)
    k.requires_grad_(True)
    summ = build_chunk_summaries(k, v, chunk)
    with _LargestAllocation() as mode:
        out = fn(q, k, v, summ, window=window, n_global=n_global)
        out.sum().backward()
    assert q.grad is not None and k.grad is not None
    return mode.largest


def test_never_allocates_t_by_t():
    T = 4096
    largest = _largest_in_forward_backward(
        sparse_global_attention, T, window=64, chunk=16, n_global=16
    )
    assert largest < T * T / 4, largest


def test_allocation_probe_sees_a_dense_matrix():
    """The probe must catch the dense reference, which builds T x T scores (forward or backward)."""
    T = 256
    largest = _largest_in_forward_backward(sparse_global_attention_dense_ref, T, 16, 4, 4)
    assert largest >= T * T
