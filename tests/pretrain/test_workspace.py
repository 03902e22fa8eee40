"""WorkspaceMemory: chunk semantics, causality, packed == separate documents, gradients, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.common.workspace import WorkspaceMemory
from pretrain.models.config import WorkspaceConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, CHUNK = 16, 4


def _build(seed: int = 0, dtype: torch.dtype = torch.float32) -> WorkspaceMemory:
    torch.manual_seed(seed)
    module = WorkspaceMemory(D_MODEL, WorkspaceConfig(n_slots=3, chunk_size=CHUNK, n_heads=2))
    module.init_weights(0.3)  # large enough that every path changes the output visibly
    with torch.no_grad():
        module.gate.bias.uniform_(-1.0, 1.0)
        module.norm.weight.uniform_(0.5, 1.5)
        module.slot_norm.weight.uniform_(0.5, 1.5)
    return module.to(dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Lq, H, K], k/v [Lk, H, K] -> [Lq, H*K], with torch's own attention."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    return out.transpose(0, 1).flatten(1)


def _kv(proj: torch.nn.Linear, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    kv = proj(x).unflatten(-1, (heads, -1))
    return kv.chunk(2, dim=-1)


def _reference(module: WorkspaceMemory, x: torch.Tensor) -> torch.Tensor:
    """One document [T, D], written as a plain loop over its chunks (no padding, no batching)."""
    heads, chunk = module.n_heads, module.chunk_size
    x_n = module.norm(x)
    state = module.slots
    reads = []
    for start in range(0, x.shape[0], chunk):
        tokens = x_n[start : start + chunk]
        state_n = module.slot_norm(state)
        k, v = _kv(module.read_kv, state_n, heads)
        reads.append(
            module.read_out(_attend(module.read_q(tokens).unflatten(-1, (heads, -1)), k, v))
        )
        k, v = _kv(module.write_kv, tokens, heads)
        update = module.write_out(_attend(module.write_q(state_n).unflatten(-1, (heads, -1)), k, v))
        gate = torch.sigmoid(module.gate(torch.cat((state_n, update), dim=-1)))
        state = (1 - gate) * state + gate * update
    return torch.cat(reads)


def _seq_idx(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def test_matches_plain_chunk_loop() -> None:
    module = _build(dtype=torch.float64)
    x = torch.randn(2, 18, D_MODEL, dtype=torch.float64)  # 18 = 4 full chunks + a partial one
    out = module(x)
    for b in range(2):
        torch.testing.assert_close(out[b], _reference(module, x[b]), rtol=1e-10, atol=1e-10)


def test_packed_equals_documents_alone() -> None:
    module = _build(seed=1, dtype=torch.float64)
    # documents start mid-chunk (5, 16, 19, ...) and at chunk boundaries; one of length 1
    layouts = [[5, 11, 3, 11], [1, 13, 16], [30]]
    x = torch.randn(len(layouts), 30, D_MODEL, dtype=torch.float64)
    seq_idx = torch.stack([_seq_idx(lengths) for lengths in layouts])
    packed = module(x, seq_idx)
    for b, lengths in enumerate(layouts):
        start = 0
        for n in lengths:
            alone = module(x[b : b + 1, start : start + n])[0]
            torch.testing.assert_close(packed[b, start : start + n], alone, rtol=1e-12, atol=1e-12)
            start += n


def test_packed_equals_documents_alone_fp32() -> None:
    module = _build(seed=2)
    lengths = [6, 9, 2, 13]
    x = torch.randn(1, 30, D_MODEL)
    packed = module(x, _seq_idx(lengths)[None])
    start = 0
    for n in lengths:
        alone = module(x[:, start : start + n])
        torch.testing.assert_close(packed[:, start : start + n], alone, rtol=1e-5, atol=1e-6)
        start += n


def _changed(
    module: WorkspaceMemory, x: torch.Tensor, seq_idx: torch.Tensor | None, perturb: int
) -> torch.Tensor:
    """[T] bool: which outputs move when token ``perturb`` of row 0 moves."""
    x2 = x.clone()
    x2[0, perturb] += torch.randn(D_MODEL)
    diff = (module(x2, seq_idx) - module(x, seq_idx))[0].abs().amax(-1)
    assert bool(((diff == 0) | (diff > 1e-6)).all()), "ambiguous dependence"
    return diff > 1e-6


def _expected(seq_len: int, starts: list[int], perturb: int) -> torch.Tensor:
    """[T] bool: outputs that may depend on token ``perturb`` (itself, later chunks of its doc)."""
    bounds = [*starts, seq_len]
    for doc_start, doc_end in zip(bounds[:-1], bounds[1:]):
        if doc_start <= perturb < doc_end:
            break
    chunk_end = doc_start + ((perturb - doc_start) // CHUNK + 1) * CHUNK
    expected = torch.zeros(seq_len, dtype=torch.bool)
    expected[perturb] = True
    expected[chunk_end:doc_end] = True
    return expected


def test_causal_and_chunk_semantics() -> None:
    module = _build(seed=3)
    x = torch.randn(1, 16, D_MODEL)
    # every token of chunk 2 (positions 8..11), chunk 0 and the last token
    for perturb in (0, 2, 8, 9, 10, 11, 15):
        assert torch.equal(_changed(module, x, None, perturb), _expected(16, [0], perturb)), perturb


def test_chunks_are_counted_from_each_document_start() -> None:
    module = _build(seed=4)
    seq_idx = _seq_idx([6, 12])[None]  # second document starts mid-chunk at 6
    x = torch.randn(1, 18, D_MODEL)
    for perturb in (1, 4, 5, 6, 7, 9, 10, 13, 17):
        got = _changed(module, x, seq_idx, perturb)
        assert torch.equal(got, _expected(18, [0, 6], perturb)), perturb


def test_gradient_reaches_every_parameter() -> None:
    module = _build(seed=5)
    x = torch.randn(2, 13, D_MODEL, requires_grad=True)
    seq_idx = torch.stack([_seq_idx([13]), _seq_idx([3, 10])])
    (module(x, seq_idx) * torch.randn(2, 13, D_MODEL)).sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bf16_autocast_finite_and_close() -> None:
    module = _build(seed=6)
    x = torch.randn(2, 40, D_MODEL)
    seq_idx = torch.stack([_seq_idx([40]), _seq_idx([7, 33])])
    want = module(x, seq_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, seq_idx)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())
    assert (out - want).abs().max() < 0.05 * want.abs().max()


def test_short_sequence_and_no_state_between_calls() -> None:
    module = _build(seed=7)
    x = torch.randn(1, 3, D_MODEL)  # shorter than one chunk: only the initial slots are read
    first = module(x)
    module(torch.randn(1, 12, D_MODEL))
    torch.testing.assert_close(module(x), first, rtol=0, atol=0)
    torch.testing.assert_close(
        module(x, torch.zeros(1, 3, dtype=torch.long)), first, rtol=0, atol=0
    )


def test_one_graph_serves_every_packing_without_breaks() -> None:
    """Shapes depend on T only: compiled with ``fullgraph`` (no host sync, no graph break), the
    module is not recompiled when the packing changes, and gives the eager reads."""
    from torch._dynamo.testing import CompileCounter

    module = _build(seed=4)
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 27, D_MODEL, generator=gen)
    packings = [
        torch.zeros(2, 27, dtype=torch.long),
        torch.stack([_seq_idx([3, 1, 9, 14]), _seq_idx([27])]),
        torch.stack([_seq_idx([1] * 27), _seq_idx([8, 8, 11])]),
    ]
    for seq_idx in packings:
        torch.testing.assert_close(compiled(x, seq_idx), module(x, seq_idx))
    assert counter.frame_count == 1
