"""Chunk-boundary attention (Attamba): blocked CPU path and FlexAttention vs a dense definition
written here with loops, the slot bound, and the cost (no T x T tensor)."""

from __future__ import annotations

import pytest
import torch

from benchmarks._measure import LargestTensor
from kernels.attention import ref as attention_ref
from kernels.attention.boundary import (
    boundary_attention,
    boundary_slot_bound,
    boundary_slots,
    chunk_ids,
)
from kernels.attention.op import chunk_boundary_attention
from pretrain.models.common.documents import positions_in_document

F64 = torch.float64
TOL = dict(rtol=1e-7, atol=1e-7)  # fp64; see test_attention_ref.py for why not 1e-12


def _dense_reference(q, k, v, seq_idx, chunk, offset, leading):
    """The op from its definition: one mask built position by position, one softmax."""
    b, T, H, K = q.shape
    rep = H // k.shape[2]
    mask = torch.zeros(b, T, T, dtype=torch.bool)
    for r in range(b):
        docs = [0] * T if seq_idx is None else seq_idx[r].tolist()
        pos_in_doc = []
        for t in range(T):
            new_doc = t == 0 or docs[t] != docs[t - 1]
            pos_in_doc.append(0 if new_doc else pos_in_doc[-1] + 1)

        def last_of_chunk(s: int, docs=docs, pos_in_doc=pos_in_doc) -> bool:
            if s + 1 == T or docs[s + 1] != docs[s]:
                return True  # a document's (or the row's) last token ends its chunk
            nxt = pos_in_doc[s + 1]
            return nxt >= offset and (nxt - offset) % chunk == 0

        for t in range(T):
            for s in range(t + 1):
                same_doc = all(docs[u] == docs[t] for u in range(s, t + 1))
                if same_doc and (t - s < leading or last_of_chunk(s)):
                    mask[r, t, s] = True
    keys, values = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhk,bshk->bhqs", q, keys) * K**-0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqs,bshk->bqhk", scores.softmax(-1), values)


def _packing(b: int, T: int, gen: torch.Generator, max_docs: int = 4) -> torch.Tensor:
    rows = []
    for _ in range(b):
        n_cuts = int(torch.randint(0, max_docs, (1,), generator=gen))
        cuts = torch.randperm(T - 1, generator=gen)[:n_cuts] + 1
        starts = torch.zeros(T, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0) + 3)  # ids need not start at 0
    return torch.stack(rows)


def _inputs(b, T, H, Hkv, K, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, T, H, K, dtype=F64, generator=gen)
    k = torch.randn(b, T, Hkv, K, dtype=F64, generator=gen)
    v = torch.randn(b, T, Hkv, K, dtype=F64, generator=gen)
    return q, k, v, gen


# (b, T, H, Hkv, K, chunk, offset, leading, packed)
CASES = [
    (2, 48, 4, 4, 8, 8, 0, 8, False),  # fixed chunking, T a multiple of P
    (2, 53, 4, 2, 8, 8, 0, 3, True),  # T not a multiple of P, leading < P, GQA, packed
    (2, 45, 2, 1, 4, 6, 4, 2, True),  # cyclic offset, MQA, packed
    (1, 61, 4, 2, 4, 5, 3, 9, True),  # cyclic, leading > P
    (2, 30, 2, 2, 4, 4, 1, 1, False),  # leading 1: each query sees itself and boundaries
    (1, 20, 2, 2, 4, 4, 2, 64, True),  # leading >= T: plain causal attention per document
    (3, 70, 4, 2, 8, 7, 6, 4, True),  # ragged everything
    (2, 5, 2, 1, 4, 8, 0, 2, True),  # T < P: no chunk completes, no slot at all
]


@pytest.fixture(params=["one_group", "many_groups"])
def score_budget(request, monkeypatch):
    if request.param == "many_groups":  # every query row its own group
        monkeypatch.setattr(attention_ref, "_SCORE_ELEMS_PER_GROUP", 1)


@pytest.mark.parametrize("case", CASES)
def test_matches_dense_reference_forward_and_backward(case, score_budget):
    b, T, H, Hkv, K, chunk, offset, leading, packed = case
    q, k, v, gen = _inputs(b, T, H, Hkv, K, seed=hash(case) % 1000)
    seq_idx = _packing(b, T, gen) if packed else None
    doc_pos = positions_in_document(seq_idx, b, T, q.device)
    kw = dict(chunk=chunk, offset=offset, leading=leading)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = boundary_attention(*leaves, doc_pos, seq_idx, **kw)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = _dense_reference(*ref_leaves, seq_idx, chunk, offset, leading)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn(out.shape, dtype=F64, generator=gen)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, **TOL)


def test_flex_forward_matches_blocked():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v, gen = _inputs(2, 70, 4, 2, 8, seed=3)
    q, k, v = q.float(), k.float(), v.float()
    seq_idx = _packing(2, 70, gen)
    doc_pos = positions_in_document(seq_idx, 2, 70, q.device)
    for offset in (0, 5):
        kw = dict(chunk=7, offset=offset, leading=4)
        want = chunk_boundary_attention(q, k, v, doc_pos, seq_idx, **kw)
        got = chunk_boundary_attention(q, k, v, doc_pos, seq_idx, **kw, backend="flex")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rows shorter than a chunk: no slot, the window alone
    short = [t[:, :5] for t in (q, k, v, doc_pos, seq_idx)]
    want = chunk_boundary_attention(*short, chunk=8, leading=2)
    got = chunk_boundary_attention(*short, chunk=8, leading=2, backend="flex")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk,offset,leading", [(4, 0, 1), (4, 3, 1), (8, 5, 2), (6, 1, 7)])
def test_slot_bound_holds_for_adversarial_packings(chunk, offset, leading):
    """Documents of exactly ``offset + leading`` tokens (each keeps its short first chunk's
    boundary) and random packings never need more slots than the static bound."""
    T = 96
    gen = torch.Generator().manual_seed(chunk * 100 + offset)
    short = max(1, offset + leading)
    adversarial = (torch.arange(T) // short)[None]
    layouts = [adversarial, None, *(_packing(1, T, gen, max_docs=40) for _ in range(30))]
    for seq_idx in layouts:
        doc_pos = positions_in_document(seq_idx, 1, T, torch.device("cpu"))
        # (a boundary beyond the bound would fail the scatter with an index error)
        slots = boundary_slots(doc_pos, seq_idx, chunk=chunk, offset=offset, leading=leading)
        assert slots.pos.shape[1] == boundary_slot_bound(T, chunk, offset, leading)
        used = slots.pos[slots.pos < T]
        assert torch.all(used[1:] > used[:-1])  # position order
        # every boundary some later query sees has a slot (an overflow would be dropped)
        docs = [0] * T if seq_idx is None else seq_idx[0].tolist()
        starts = [
            doc_pos[0, t] == 0
            or (doc_pos[0, t] >= offset and (doc_pos[0, t] - offset) % chunk == 0)
            for t in range(T)
        ]
        needed = [
            s
            for s in range(T - leading)
            if (s + 1 == T or starts[s + 1]) and docs[s + leading] == docs[s]
        ]
        assert used.tolist() == needed
    # the adversarial row fills every short-first slot the bound allows for it
    doc_pos = positions_in_document(adversarial, 1, T, torch.device("cpu"))
    slots = boundary_slots(doc_pos, adversarial, chunk=chunk, offset=offset, leading=leading)
    if offset > 0:
        assert int((slots.pos < T).sum()) == T // short


def test_a_row_that_continues_a_document_keeps_every_boundary():
    """doc_pos need not start at 0 (a row cut from inside a document): its first short chunk
    is one more boundary than the in-row documents account for."""
    doc_pos = torch.arange(3, 10)[None]  # P = 4: boundaries at row positions 0 and 4
    slots = boundary_slots(doc_pos, None, chunk=4, offset=0, leading=1)
    assert slots.pos[0][slots.pos[0] < 7].tolist() == [0, 4]


def test_slot_shapes_do_not_depend_on_packing():
    T = 64
    gen = torch.Generator().manual_seed(0)
    shapes = set()
    for _ in range(10):
        seq_idx = _packing(2, T, gen, max_docs=8)
        doc_pos = positions_in_document(seq_idx, 2, T, torch.device("cpu"))
        shapes.add(tuple(boundary_slots(doc_pos, seq_idx, chunk=8, offset=3, leading=4).pos.shape))
    assert len(shapes) == 1


def test_chunk_ids_restart_at_documents_and_chunks():
    seq_idx = torch.tensor([[0] * 7 + [1] * 6])
    doc_pos = positions_in_document(seq_idx, 1, 13, torch.device("cpu"))
    ids = chunk_ids(doc_pos, chunk=4, offset=2)
    # document 0: chunks [0, 2), [2, 6), [6, 7); document 1: [7, 9), [9, 13)
    assert ids.tolist() == [[1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 5, 5, 5]]


def _largest(T: int, chunk: int, leading: int) -> int:
    q, k, v, _ = _inputs(1, T, 2, 1, 8, seed=7)
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    doc_pos = positions_in_document(None, 1, T, q.device)
    with LargestTensor() as probe:
        out = boundary_attention(q, k, v, doc_pos, chunk=chunk, leading=leading)
        out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return probe.numel


def test_largest_tensor_grows_linearly_in_length(monkeypatch):
    large = _largest(8192, 16, 32)
    assert large < 8192 * 8192 / 16, large  # far below one T x T matrix
    # with a score budget below q's size, what is left is linear in T: 4x the length, ~4x
    monkeypatch.setattr(attention_ref, "_SCORE_ELEMS_PER_GROUP", 1 << 14)
    small, large = _largest(2048, 16, 32), _largest(8192, 16, 32)
    assert large <= 4.5 * small, (small, large)


def test_probe_sees_the_dense_reference():
    T = 128
    q, k, v, _ = _inputs(1, T, 2, 1, 8, seed=1)
    with LargestTensor() as probe:
        _dense_reference(q, k, v, None, 8, 0, 4)
    assert probe.numel >= T * T


def test_bad_arguments_are_named():
    q, k, v, _ = _inputs(1, 16, 2, 1, 4, seed=0)
    doc_pos = positions_in_document(None, 1, 16, q.device)
    with pytest.raises(ValueError, match="offset"):
        boundary_attention(q, k, v, doc_pos, chunk=4, offset=4, leading=2)
    with pytest.raises(ValueError, match="leading"):
        boundary_attention(q, k, v, doc_pos, chunk=4, leading=0)
    with pytest.raises(ValueError, match="doc_pos"):
        boundary_attention(q, k, v, doc_pos[:, :8], chunk=4, leading=2)
    with pytest.raises(ValueError, match="unknown"):
        chunk_boundary_attention(q, k, v, doc_pos, chunk=4, leading=2, backend="flash_attn")
