"""Causal attention over packed documents: the blocked path and FlexAttention's mask against an
explicit fp64 softmax over a masked T x T score matrix, its tracing, and its memory."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from kernels.attention import causal
from kernels.attention.causal import (
    document_causal_attention,
    document_causal_attention_ref,
    resolve_backend,
)
from kernels.attention.ref import document_ids
from kernels.backends import BackendUnavailableError

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _dense_reference(q, k, v, seq_idx, scale=None):
    """fp64 softmax over the [b, H, T, T] scores, keys s <= t with no change of seq_idx between."""
    b, T, H, K = q.shape
    g = H // k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * (K**-0.5 if scale is None else scale)
    visible = torch.ones(T, T, dtype=torch.bool).tril().expand(b, T, T)
    if seq_idx is not None:
        # the number of changes of seq_idx before each position names its document
        changes = torch.cat([seq_idx.new_zeros(b, 1), (seq_idx.diff(dim=1) != 0).long()], 1)
        n = changes.cumsum(1)
        visible = visible & (n[:, :, None] == n[:, None, :])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhts,bshk->bthk", scores.softmax(-1), v)


def _packing(kind: str, b: int, T: int, block: int, gen: torch.Generator) -> torch.Tensor | None:
    """seq_idx [b, T] of one packing kind (None: no seq_idx at all)."""
    if kind == "none":
        return None
    if kind == "one_doc":
        return torch.full((b, T), 3)
    if kind == "block_edges":  # documents start exactly on, one before and one after block edges
        cuts = [c for e in range(block, T, block) for c in (e - 1, e, e + 1) if 0 < c < T]
        marks = torch.zeros(b, T, dtype=torch.long)
        marks[:, cuts] = 1
        return marks.cumsum(1)
    if kind == "short_docs":  # many documents of 1..12 tokens, ids neither from 0 nor contiguous
        marks = (torch.rand(b, T, generator=gen) < 0.15).long()
        return marks.cumsum(1) * 5 + 11
    if kind == "reused_ids":  # a change back to an earlier id is still a new document
        return (torch.arange(T) // 7 % 2).expand(b, T).clone()
    if kind == "trainer_like":  # whole documents of 20..60 tokens, then a padding document
        rows = []
        for _ in range(b):
            lengths = torch.randint(20, 60, (T,), generator=gen)
            starts = lengths.cumsum(0)
            ends = starts[starts < T - 15]
            marks = torch.zeros(T, dtype=torch.long)
            marks[ends] = 1
            rows.append(marks.cumsum(0))
        return torch.stack(rows)
    raise ValueError(kind)


def _inputs(b, T, H, Hkv, K, dtype, gen):
    shapes = [(b, T, H, K), (b, T, Hkv, K), (b, T, Hkv, K)]
    return [torch.randn(s, generator=gen, dtype=F64).to(dtype).requires_grad_() for s in shapes]


# (b, T, H, Hkv, K, block, packing): several blocks at small T, and the default block at larger T
CASES = [
    (2, 128, 4, 4, 8, 32, "one_doc"),
    (2, 200, 4, 2, 8, 64, "short_docs"),  # T not a multiple of the block, GQA
    (1, 256, 2, 1, 16, 64, "block_edges"),  # multi-query heads
    (2, 96, 4, 2, 8, 32, "reused_ids"),
    (3, 150, 2, 2, 8, 48, "trainer_like"),
    (2, 77, 4, 2, 8, 128, "short_docs"),  # one block shorter than the block size
    (2, 100, 4, 2, 8, 32, "none"),
    (1, 1100, 4, 2, 8, causal.QUERY_BLOCK, "trainer_like"),
    (1, 2100, 2, 1, 8, causal.QUERY_BLOCK, "block_edges"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b, T, H, Hkv, K, block, packing", CASES)
def test_matches_dense_reference_forward_and_backward(b, T, H, Hkv, K, block, packing, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((b, T, H, Hkv, block, packing)).encode()))
    q, k, v = _inputs(b, T, H, Hkv, K, dtype, gen)
    seq_idx = _packing(packing, b, T, block, gen)
    scale = 0.3 if packing == "short_docs" else None
    out = document_causal_attention(q, k, v, seq_idx, scale, backend="torch", block=block)
    assert out.shape == q.shape and out.dtype == dtype

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = _dense_reference(*leaves, seq_idx, scale)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])

    grad_out = torch.randn(q.shape, generator=gen, dtype=F64)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out)
    for name, got, ref in zip("qkv", (q, k, v), leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, **TOL[dtype], msg=name)


@pytest.mark.parametrize("packing", ["short_docs", "block_edges", "none"])
def test_dense_mask_definition_agrees_with_the_reference(packing: str) -> None:
    """Two independent references: the dense-mask SDPA of the module and the explicit softmax."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(2, 90, 4, 2, 8, F64, gen)
    seq_idx = _packing(packing, 2, 90, 32, gen)
    torch.testing.assert_close(
        document_causal_attention_ref(q, k, v, seq_idx), _dense_reference(q, k, v, seq_idx)
    )


def test_every_position_has_its_own_document_when_ids_always_change() -> None:
    """Each token its own document: the output is its own value."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(1, 70, 2, 1, 8, F64, gen)
    seq_idx = torch.arange(70)[None]
    out = document_causal_attention(q, k, v, seq_idx, backend="torch", block=16)
    torch.testing.assert_close(out, v.expand_as(out))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T, packing", [(200, "short_docs"), (256, "block_edges")])
def test_flex_mask_mod_matches_reference_forward(T: int, packing: str) -> None:
    """FlexAttention's document-causal mask_mod (eager on CPU: forward only)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.detach() for t in _inputs(2, T, 4, 2, 8, torch.float32, gen))
    seq_idx = _packing(packing, 2, T, 128, gen)
    out = causal._flex(q, k, v, document_ids(seq_idx, 2, T, q.device), None)
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, seq_idx), **TOL[q.dtype])


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(BackendUnavailableError, match="flex"):
        resolve_backend("flex", cpu)
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("triton", cpu)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="seq_idx"):
        document_causal_attention(q, q, q, torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="divide"):
        document_causal_attention(q, q[:, :, :1].expand(1, 8, 3, 4), q[:, :, :1].expand(1, 8, 3, 4))


def test_one_graph_without_breaks_for_every_packing() -> None:
    """fullgraph tracing (no graph break, no host sync) and no recompilation when the packing
    changes: block boundaries come from T only. Forward and backward match eager."""
    T, block = 160, 64
    counter = CompileCounter()

    def fn(q, k, v, seq_idx):
        return document_causal_attention(q, k, v, seq_idx, block=block)

    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=False)
    gen = torch.Generator().manual_seed(6)
    for packing in ("short_docs", "block_edges", "one_doc", "trainer_like"):
        q, k, v = _inputs(2, T, 4, 2, 8, torch.float32, gen)
        seq_idx = _packing(packing, 2, T, block, gen)
        out = compiled(q, k, v, seq_idx)
        out.square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        expected = fn(q, k, v, seq_idx)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected)
        for got, t in zip(grads, (q, k, v), strict=True):
            torch.testing.assert_close(got, t.grad)
    assert counter.frame_count == 1


def test_fullgraph_with_eager_backend() -> None:
    compiled = torch.compile(document_causal_attention, fullgraph=True, backend="eager")
    gen = torch.Generator().manual_seed(8)
    q, k, v = _inputs(1, 1300, 2, 1, 8, torch.float32, gen)  # two default blocks
    seq_idx = _packing("trainer_like", 1, 1300, 512, gen)
    torch.testing.assert_close(
        compiled(q, k, v, seq_idx), document_causal_attention(q, k, v, seq_idx)
    )


def _largest_allocation(fn, T: int, seq_idx: torch.Tensor) -> int:
    """Largest single allocation in bytes (the CPU allocator, as the profiler records it, so
    buffers inside a kernel count too) in a forward and backward of ``fn``."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(9)
    q, k, v = _inputs(1, T, 2, 1, 8, torch.float32, gen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(q, k, v, seq_idx).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    largest, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            largest = max(largest, node.extra_fields.alloc_size)
        stack.extend(node.children)
    return largest


def test_never_allocates_t_by_t() -> None:
    """At T = 8 blocks the largest allocation is one block's fp32 mask, 4 W T bytes = T^2 / 2."""
    T = 8 * causal.QUERY_BLOCK
    seq_idx = _packing("trainer_like", 1, T, 512, torch.Generator().manual_seed(10))
    largest = _largest_allocation(document_causal_attention, T, seq_idx)
    assert largest <= T * T / 2, largest  # a dense bool mask alone is T * T bytes


def test_allocation_probe_sees_the_dense_mask() -> None:
    T = 512
    seq_idx = _packing("trainer_like", 1, T, 512, torch.Generator().manual_seed(11))
    assert _largest_allocation(document_causal_attention_ref, T, seq_idx) >= T * T


def test_cpu_training_keeps_no_block_mask_for_backward() -> None:
    """The CPU path rebuilds each block's mask in backward: what autograd keeps is q, k, v, the
    outputs, their log-sum-exps and the document ids, O(T), never a [b, 1, W, e] mask (SDPA's
    own autograd keeps it: O(T^2) per layer); gradients as the dense reference's."""
    T, block, K = 96, 32, 8
    gen = torch.Generator().manual_seed(12)
    q, k, v = _inputs(1, T, 2, 2, K, torch.float32, gen)
    seq_idx = _packing("block_edges", 1, T, block, gen)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = document_causal_attention(q, k, v, seq_idx, backend="torch", block=block)
    masks = [t for t in saved if t.dim() == 4 and t.shape[-1] != K]
    assert saved and not masks, [tuple(t.shape) for t in masks]
    out.backward(torch.ones_like(out))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _dense_reference(*leaves, seq_idx).backward(torch.ones(q.shape, dtype=F64))
    for got, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(got.grad.double(), ref.grad, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_on_gpu_forward_and_backward() -> None:
    """auto takes FlexAttention on CUDA; forward and gradients against the fp64 reference."""
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    gen = torch.Generator().manual_seed(12)
    q, k, v = (
        t.detach().float().cuda().requires_grad_() for t in _inputs(2, 300, 4, 2, 64, F64, gen)
    )
    seq_idx = _packing("trainer_like", 2, 300, 128, gen).cuda()
    out = document_causal_attention(q, k, v, seq_idx)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected = _dense_reference(*leaves, seq_idx.cpu())
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-3, atol=2e-3)
    grad_out = torch.randn(q.shape, generator=gen, dtype=F64)
    out.backward(grad_out.float().cuda())
    expected.backward(grad_out)
    for got, ref in zip((q, k, v), leaves, strict=True):
        torch.testing.assert_close(got.grad.cpu().double(), ref.grad, rtol=2e-3, atol=2e-3)
