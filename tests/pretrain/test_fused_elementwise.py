"""The fused elementwise ops (``causal_conv_silu``, ``rms_norm``, ``silu_mul``) against their plain references
(the op chains they replaced): outputs and gradients on random inputs with packed documents,
ragged lengths, carried-in conv state, bf16 inputs, CPU blocks smaller than the sequence; and
what they keep for backward. The conv and the norm run in both their forms: the PyTorch ops and
the fused C++ kernels they dispatch to on CPU (``kernels/cpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu import native
from kernels.ssd import document_ids
from pretrain.models.common import blocking, ssm
from pretrain.models.common.causal_conv import causal_conv_silu, causal_conv_silu_ref
from pretrain.models.common.fused_norm import rms_norm, rms_norm_ref
from pretrain.models.common.layers import silu_mul
from pretrain.models.config import SSMConfig

# tiny ops: one intra-op thread (tests/kernels/test_cpu_kernels.py varies the thread count)
pytestmark = pytest.mark.usefixtures("one_thread")

K = 4


def packed_seq_idx(batch: int, seq_len: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] non-decreasing document ids, as the reader packs rows."""
    return torch.randint(0, n_docs, (batch, seq_len), generator=gen).sort(dim=1).values


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.fixture(params=["whole", "small_blocks"])
def block_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with one block per tensor and with blocks of a few rows (the CPU path of a
    long sequence: carried rows between blocks, a shorter last block)."""
    if request.param == "small_blocks":
        monkeypatch.setattr(blocking, "CPU_BLOCK_BYTES", 4 * 2 * 10 * 5)  # 5 rows of [2, X=10]
    return request.param


@pytest.fixture(params=["torch", "native"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The PyTorch form of each op, and the fused C++ kernel it dispatches to on CPU."""
    monkeypatch.setenv(native.ENV, request.param)
    if request.param == "native" and native.native_kernels() is None:
        pytest.fail("the fused CPU kernels did not build: see the logged warning")
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("seq_len", [1, 2, 3, 17, 40])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_causal_conv_matches_reference(
    impl: str,
    block_bytes: str,
    seq_len: int,
    with_prefix: bool,
    with_docs: bool,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(seq_len * 7 + with_prefix * 2 + with_docs)
    B, X = 2, 10

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    # x as the mixer passes it: a non-contiguous slice of a wider projection
    wide = rand(B, seq_len, 3 * X)
    x = wide[..., X : 2 * X]
    weight, bias = rand(X, K), rand(X)
    prefix = rand(B, K - 1, X) if with_prefix else None
    doc = document_ids(packed_seq_idx(B, seq_len, 5, gen)) if with_docs else None
    inputs = [t for t in (wide, weight, bias, prefix) if t is not None]

    out = causal_conv_silu(x, weight, bias, prefix, doc)
    ref = causal_conv_silu_ref(x, weight, bias, prefix, doc)
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref, dtype)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=dtype)
    for got, want in zip(grads(out, inputs, grad_out), grads(ref, inputs, grad_out)):
        assert_close(got, want, dtype)


def test_causal_conv_gradcheck(impl: str, block_bytes: str) -> None:
    gen = torch.Generator().manual_seed(0)
    B, T, X = 2, 12, 10
    args = [
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
        for shape in ((B, T, X), (X, K), (X,), (B, K - 1, X))
    ]
    doc = document_ids(packed_seq_idx(B, T, 4, gen))
    assert torch.autograd.gradcheck(lambda *a: causal_conv_silu(*a, doc), args)


def test_causal_conv_bf16_input_keeps_bf16_for_backward(block_bytes: str) -> None:
    """Under autocast the projection's output is bf16: the op computes in fp32 like the
    reference, and what it saves is the bf16 input itself (no fp32 copy)."""
    gen = torch.Generator().manual_seed(1)
    B, T, X = 2, 23, 10
    x = torch.randn(B, T, X, generator=gen).bfloat16().requires_grad_()
    weight, bias = torch.randn(X, K, generator=gen), torch.randn(X, generator=gen)
    doc = document_ids(packed_seq_idx(B, T, 3, gen))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = causal_conv_silu(x, weight, bias, None, doc)
    assert out.dtype == torch.float32
    assert any(t is x for t in saved)
    assert all(t.dtype != torch.float32 or t.numel() <= weight.numel() for t in saved)
    ref = causal_conv_silu_ref(x, weight, bias, None, doc)
    assert_close(out, ref, torch.float32)
    grad_out = torch.randn(ref.shape, generator=gen)
    (got,), (want,) = grads(out, [x], grad_out), grads(ref, [x], grad_out)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group_size", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(
    impl: str, block_bytes: str, gated: bool, group_size: int | None, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(int(gated) * 10 + (group_size or 0))
    B, T, E = 2, 13, 10
    x = torch.randn(B, T, E, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(E, generator=gen).requires_grad_()
    wide = torch.randn(B, T, 3 * E, generator=gen, dtype=dtype).requires_grad_()
    gate = wide[..., E : 2 * E] if gated else None  # a strided view, as the mixer's z
    out_dtype = torch.float32 if gated else None  # the gated norm's callers take fp32
    kw = {"gate": gate, "group_size": group_size, "out_dtype": out_dtype}
    inputs = [x, weight] + ([wide] if gated else [])

    out = rms_norm(x, weight, 1e-5, **kw)
    ref = rms_norm_ref(x, weight, 1e-5, **kw)
    assert out.dtype == ref.dtype
    if dtype != torch.bfloat16 and impl == "torch":  # same ops in the same order: the same bits
        assert torch.equal(out, ref)
    assert_close(out, ref, dtype)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    for got, want in zip(grads(out, inputs, grad_out), grads(ref, inputs, grad_out)):
        assert got.dtype == want.dtype
        scale = want.abs().max().item()
        assert_close(got.double() / scale, want.double() / scale, dtype)


def test_rms_norm_gradcheck(impl: str, block_bytes: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x, gate = (torch.randn(2, 7, 10, generator=gen, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(10, generator=gen, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, gate, weight)]
    assert torch.autograd.gradcheck(
        lambda x, g, w: rms_norm(x, w, 1e-5, gate=g, group_size=5), args
    )
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), [args[0], args[2]])


def test_rms_norm_saves_inputs_and_row_scales_only() -> None:
    x = torch.randn(3, 8, 10, requires_grad=True)
    gate = torch.randn(3, 8, 10).bfloat16().requires_grad_()
    weight = torch.ones(10, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, weight, 1e-5, gate=gate, group_size=5, out_dtype=torch.float32)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 2 and {t.dtype for t in big} == {torch.float32, torch.bfloat16}
    assert sum(t.numel() for t in saved if t.numel() != x.numel()) <= 10 + 3 * 8 * 2


def test_mixer_with_fused_ops_matches_the_op_chains(
    impl: str, block_bytes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Mamba-2 mixer on packed rows with a carried-in state: the same outputs and gradients
    as with the plain references wired in (the conv and the gated norm as they were)."""
    cfg = SSMConfig(d_state=8, head_dim=4, expand=2, chunk_size=8, d_conv=K)
    torch.manual_seed(0)
    mixer = ssm.Mamba2Mixer(8, cfg)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 8, generator=gen, requires_grad=True)
    seq_idx = packed_seq_idx(2, 21, 4, gen)
    conv_state = torch.randn(2, K - 1, mixer.conv_dim, generator=gen)

    def run() -> tuple[torch.Tensor, ...]:
        out, state = mixer(x, seq_idx, conv_state=conv_state, return_state=True)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        params = [x, *mixer.parameters()]
        return (out, state.conv, *torch.autograd.grad(loss, params))

    fused = run()
    with monkeypatch.context() as m:
        m.setattr(ssm, "causal_conv_silu", causal_conv_silu_ref)
        m.setattr(ssm, "rms_norm", rms_norm_ref)
        plain = run()
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_is_the_op_chain_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randn(3, 11, 40, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = silu_mul(a, b)
    assert len(saved) == 2 and saved[0] is a and saved[1] is b  # not silu(a)
    ref = F.silu(a) * b
    assert torch.equal(out, ref)
    grad_out = torch.randn(ref.shape, generator=gen).to(dtype)
    for got, want in zip(grads(out, [a, b], grad_out), grads(ref, [a, b], grad_out)):
        assert torch.equal(got, want)
