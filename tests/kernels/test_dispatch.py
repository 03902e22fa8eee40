"""Dispatch functions: every backend that can run on CPU against the op's reference.

GPU-only packages (mamba_ssm, megablocks, flash-attn) are not installed here. Their glue code is
run against small stand-ins that follow each package's documented semantics (argument dtypes,
layouts, what the autograd returns), which checks our argument mapping, layouts and merges; the
packages' own kernels are not exercised.
"""

from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import kernels.attention.flash as flash_mod
import kernels.ssd.op as ssd_op
from kernels.attention.op import sparse_global_attention
from kernels.attention.ref import build_chunk_summaries, sparse_global_attention_dense_ref
from kernels.backends import BACKENDS, BackendUnavailableError, select_backends
from kernels.moe.op import moe_experts
from kernels.moe.ref import grouped_mm_problem, moe_experts_loop_ref
from kernels.pkm.op import pkm_lookup
from kernels.ssd.op import ssd_scan
from kernels.ssd.ref import ssd_scan_chunked, ssd_scan_sequential
from pretrain.models.common.documents import positions_in_document
from pretrain.models.kernel_backends import apply_kernel_backends
from tests.pretrain.model_helpers import build_from_config, random_tokens

FLEX_EAGER = "ignore:flex_attention called without torch.compile"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ ssd


def _ssd_inputs(b=2, T=23, H=4, P=4, G=2, N=8, dtype=torch.float64, seed=0):
    g = _gen(seed)
    x = torch.randn(b, T, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, T, H, generator=g, dtype=dtype))
    A = -torch.rand(H, generator=g, dtype=dtype) - 0.2
    B = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=g, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=g, dtype=dtype)
    seq_idx = torch.zeros(b, T, dtype=torch.long)
    seq_idx[0], seq_idx[0, 2 * T // 5 :] = 3, 7  # not canonical: 3 is the row's first document
    return x, dt, A, B, C, h0, seq_idx


def _ssd_value_and_grads(fn, x, dt, A, B, C, h0, seq_idx):
    """(y, final state) and the gradients of x, dt, A, B, C, h0 for random cotangents of both."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt, A, B, C, h0)]
    y, h = fn(*leaves, seq_idx)
    g = _gen(98)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    return (y.detach(), h.detach()), torch.autograd.grad(loss, leaves)


def test_ssd_torch_dispatch_equals_the_sequential_definition() -> None:
    # chunk 8 over T=23: a partial last chunk, and documents that start inside chunks
    def torch_path(x, dt, A, B, C, h0, seq_idx):
        return ssd_scan(x, dt, A, B, C, 8, initial_state=h0, seq_idx=seq_idx, backend="torch")

    inputs = _ssd_inputs(seed=11)
    out_ref, g_ref = _ssd_value_and_grads(ssd_scan_sequential, *inputs)
    out, g = _ssd_value_and_grads(torch_path, *inputs)
    for name, a, b in zip(("y", "final state"), out, out_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_ssd_triton_dispatch_routes_and_reports_a_missing_module(monkeypatch) -> None:
    calls = []

    def fake_scan(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None):
        calls.append((chunk_size, initial_state is not None, seq_idx is not None))
        return ssd_scan_chunked(x, dt, A, B, C, chunk_size, initial_state, seq_idx)

    x, dt, A, B, C, h0, seq_idx = _ssd_inputs(T=5)
    fake = types.ModuleType("kernels.ssd.triton")
    fake.ssd_scan_triton = fake_scan
    monkeypatch.setitem(sys.modules, "kernels.ssd.triton", fake)
    ssd_scan(x, dt, A, B, C, 4, initial_state=h0, seq_idx=seq_idx, backend="triton")
    assert calls == [(4, True, True)]
    monkeypatch.setitem(sys.modules, "kernels.ssd.triton", None)  # import now fails
    with pytest.raises(BackendUnavailableError, match="kernels.ssd.triton"):
        ssd_scan(x, dt, A, B, C, 4, backend="triton")
    with pytest.raises(ValueError, match="unknown ssd backend"):
        ssd_scan(x, dt, A, B, C, 4, backend="cuda")


# A stand-in for an installed mamba_ssm whose package __init__ cannot load its CUDA extension.
# ssd_combined follows mamba_chunk_scan_combined's documented semantics: dt + dt_bias, optional
# softplus, clamp to dt_limit, state reset where seq_idx changes, initial_states only for
# positions whose seq_idx is 0, int32 seq_idx, D and z applied to the output.
_MAMBA_INIT = "import selective_scan_cuda_not_built  # the CUDA extension is missing\n"
_MAMBA_HELPER = """
import torch

def sequential(x, dt, A, B, C, h0, seq_idx):
    b, T, H, P = x.shape
    rep = H // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    h = x.new_zeros(b, H, P, B.shape[-1]) if h0 is None else h0.clone()
    if seq_idx is not None:
        h = h * (seq_idx[:, 0] == 0).to(h.dtype)[:, None, None, None]
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(h.dtype)[:, None, None, None]
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    return torch.stack(ys, 1), h
"""
_MAMBA_SSD = """
import torch
import torch.nn.functional as F
from mamba_ssm.ops.triton.ssd_helper import sequential  # absolute import of a sibling

def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                              initial_states=None, seq_idx=None, dt_softplus=False,
                              dt_limit=(0.0, float("inf")), return_final_states=False):
    assert seq_idx is None or (seq_idx.dtype == torch.int32 and seq_idx.is_contiguous())
    assert B.stride(-1) == 1 and C.stride(-1) == 1
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(*dt_limit)
    y, final = sequential(x, dt, A, B, C, initial_states, seq_idx)
    if D is not None:
        y = y + x * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return (y.to(x.dtype), final) if return_final_states else y.to(x.dtype)
"""


@pytest.fixture
def fake_mamba(tmp_path, monkeypatch):
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text(_MAMBA_INIT)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_helper.py").write_text(textwrap.dedent(_MAMBA_HELPER))
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(textwrap.dedent(_MAMBA_SSD))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ssd_op, "_mamba_chunk_scan", None)
    yield
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]


def test_mamba_ssm_loads_without_its_package_init_and_maps_arguments(fake_mamba) -> None:
    with pytest.raises(ImportError):
        import mamba_ssm  # noqa: F401 - the package __init__ itself is broken
    x, dt, A, B, C, h0, seq_idx = _ssd_inputs(dtype=torch.float32)
    y, h = ssd_scan(x, dt, A, B, C, 8, initial_state=h0, seq_idx=seq_idx, backend="mamba_ssm")
    assert "mamba_ssm.ops.triton.ssd_combined" in sys.modules
    assert sys.modules["mamba_ssm"].__doc__.startswith("Stand-in")
    as64 = [t.double() for t in (x, dt, A, B, C, h0)]
    y_ref, h_ref = ssd_scan_sequential(*as64, seq_idx)
    assert y.dtype == x.dtype and h.dtype == torch.float32
    y_ref, h_ref = y_ref.float(), h_ref.float()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_mamba_ssm_missing_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(ssd_op, "_mamba_chunk_scan", None)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    x, dt, A, B, C, _, _ = _ssd_inputs(T=3)
    with pytest.raises(BackendUnavailableError, match="mamba_ssm"):
        ssd_scan(x, dt, A, B, C, 4, backend="mamba_ssm")


# ------------------------------------------------------------------------------------ pkm


def _pkm_gather_ref(values, indices, weights):
    """The bag by indexing and a sum (the torch backend is ``F.embedding_bag``, not this)."""
    return (weights[..., None] * values[indices]).sum(1)


def test_pkm_torch_dispatch_equals_gather_and_sum() -> None:
    g = _gen(12)
    values = torch.randn(50, 6, generator=g, dtype=torch.float64)
    indices = torch.randint(0, 50, (7, 5), generator=g)
    indices[0, 1], indices[3] = indices[0, 0], indices[2]  # a row twice in a bag and across bags
    weights = torch.rand(7, 5, generator=g, dtype=torch.float64)
    grad_out = torch.randn(7, 6, generator=g, dtype=torch.float64)

    def value_and_grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (values, weights)]
        out = fn(leaves[0], indices, leaves[1])
        return out.detach(), torch.autograd.grad((out * grad_out).sum(), leaves)

    out_ref, g_ref = value_and_grads(_pkm_gather_ref)
    out, grads = value_and_grads(lambda v, i, w: pkm_lookup(v, i, w, backend="torch"))
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("values", "weights"), grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"grad of {name}")
    with pytest.raises(ValueError, match="unknown pkm backend"):
        pkm_lookup(values, indices, weights, backend="flex")


def test_pkm_triton_missing_module_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "kernels.pkm.triton", None)
    v, i, w = torch.randn(4, 2), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(BackendUnavailableError, match="kernels.pkm.triton"):
        pkm_lookup(v, i, w, backend="triton")


# ------------------------------------------------------------------------------------ moe


def _moe_inputs(n, k, n_experts, d, f, used, dtype, seed):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    expert_idx = torch.tensor(used)[torch.randint(0, len(used), (n, k), generator=g)]
    weights = torch.rand(n, k, generator=g, dtype=dtype)
    w1 = torch.randn(n_experts, d, f, generator=g, dtype=dtype) / d**0.5
    w3 = torch.randn(n_experts, d, f, generator=g, dtype=dtype) / d**0.5
    w2 = torch.randn(n_experts, f, d, generator=g, dtype=dtype) / f**0.5
    return x, expert_idx, weights, w1, w3, w2


def _value_and_grads(fn, x, expert_idx, weights, w1, w3, w2):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w1, w3, w2)]
    y = fn(leaves[0], expert_idx, *leaves[1:])
    grad_out = torch.randn(y.shape, generator=_gen(99), dtype=y.dtype)
    grads = torch.autograd.grad((y * grad_out).sum(), leaves)
    return y.detach(), grads


MOE_CASES = [(1, 1, 4, [2]), (13, 2, 6, [1, 2, 5]), (20, 2, 4, [0, 1, 2, 3])]


@pytest.mark.parametrize("n,k,n_experts,used", MOE_CASES)
@pytest.mark.parametrize("backend", ["torch", "grouped_mm"])
def test_moe_dispatch_equals_loop_reference_fp32(backend, n, k, n_experts, used) -> None:
    inputs = _moe_inputs(n, k, n_experts, 8, 12, used, torch.float32, seed=n)
    if backend == "grouped_mm" and grouped_mm_problem(inputs[0], inputs[3]) is not None:
        pytest.skip(grouped_mm_problem(inputs[0], inputs[3]))
    y_ref, g_ref = _value_and_grads(moe_experts_loop_ref, *inputs)
    y, g = _value_and_grads(lambda *a: moe_experts(*a, backend=backend), *inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weights", "w1", "w3", "w2"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad of {name}")


def test_moe_grouped_mm_follows_autocast() -> None:
    x, idx, w, w1, w3, w2 = _moe_inputs(9, 2, 4, 16, 24, [0, 1, 3], torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_experts(x, idx, w, w1, w3, w2, backend="grouped_mm")
    assert y.dtype == torch.float32  # bf16 expert outputs combined with fp32 weights
    y_ref = moe_experts_loop_ref(x.double(), idx, w.double(), w1.double(), w3.double(), w2.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=2e-2, atol=2e-2)  # bf16 matmul rounding
    y32 = moe_experts(x, idx, w, w1, w3, w2, backend="grouped_mm")
    assert not torch.equal(y, y32)  # autocast did run the matmuls in bf16


def _fake_megablocks(monkeypatch) -> list[str]:
    """Stand-ins for megablocks.ops and grouped_gemm.ops with their documented conventions."""
    seen = []

    def sort(x, end_bit):
        assert x.dtype == torch.int32 and int(x.max()) < 2**end_bit
        values, order = torch.sort(x, stable=True)  # megablocks' CUB radix sort is stable
        return values, order.int()

    def gather(x, indices, bin_ids, bins, top_k):
        seen.append("gather")
        return x.index_select(0, indices.long() // top_k)  # row p of the pairs = token p // k

    def gmm(a, b, batch_sizes, trans_b=False):
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        seen.append("gmm")
        parts = a.split(batch_sizes.tolist())
        return torch.cat([p @ (b[e].t() if trans_b else b[e]) for e, p in enumerate(parts)])

    ops = types.ModuleType("megablocks.ops")
    ops.sort, ops.gather = sort, gather
    ops.histogram = lambda x, n: torch.bincount(x, minlength=n).int()
    ops.inclusive_cumsum = lambda x, dim: x.cumsum(dim).int()
    package = types.ModuleType("megablocks")
    package.ops = ops
    grouped_gemm = types.ModuleType("grouped_gemm")
    grouped_gemm.ops = types.SimpleNamespace(gmm=gmm)
    monkeypatch.setitem(sys.modules, "megablocks", package)
    monkeypatch.setitem(sys.modules, "megablocks.ops", ops)
    monkeypatch.setitem(sys.modules, "grouped_gemm", grouped_gemm)
    return seen


def test_moe_megablocks_glue_equals_loop_reference(monkeypatch) -> None:
    seen = _fake_megablocks(monkeypatch)
    inputs = _moe_inputs(13, 2, 6, 8, 12, [1, 2, 5], torch.float64, seed=4)  # empty experts
    y_ref, g_ref = _value_and_grads(moe_experts_loop_ref, *inputs)
    y, g = _value_and_grads(lambda *a: moe_experts(*a, backend="megablocks"), *inputs)
    # the permutation is the shared torch one (expert parallelism sends the sorted rows between
    # it and the experts); megablocks contributes the grouped GEMM
    assert seen == ["gmm", "gmm", "gmm"]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_moe_unavailable_backends_are_clear_errors(monkeypatch) -> None:
    inputs = _moe_inputs(3, 1, 2, 8, 8, [0], torch.float32, seed=5)
    monkeypatch.setitem(sys.modules, "megablocks", None)
    monkeypatch.setitem(sys.modules, "megablocks.ops", None)
    with pytest.raises(BackendUnavailableError, match="megablocks"):
        moe_experts(*inputs, backend="megablocks")
    with pytest.raises(ValueError, match="unknown moe backend"):
        moe_experts(*inputs, backend="loop")


# ------------------------------------------------------------------------------ attention


def _attention_inputs(b=2, T=45, H=4, Hkv=2, K=8, dtype=torch.float64, seed=0):
    g = _gen(seed)
    q = torch.randn(b, T, H, K, generator=g, dtype=dtype)
    k = torch.randn(b, T, Hkv, K, generator=g, dtype=dtype)
    v = torch.randn(b, T, Hkv, K, generator=g, dtype=dtype)
    seq_idx = torch.zeros(b, T, dtype=torch.long)
    seq_idx[0, 20:], seq_idx[0, 33:], seq_idx[1, 7:] = 1, 2, 5  # documents start mid-window
    return q, k, v, seq_idx


def _summaries(k, v, seq_idx, chunk):
    pos = positions_in_document(seq_idx, k.shape[0], k.shape[1], k.device)
    return build_chunk_summaries(k, v, chunk, pos)


ATTN_CASES = [  # window, summary chunk, n_global, packed
    (8, 4, 3, True),
    (8, 4, 3, False),
    (5, 3, 1, True),
    (16, 4, 0, True),  # local only
]


@pytest.mark.filterwarnings(FLEX_EAGER)
@pytest.mark.parametrize("window,chunk,n_global,packed", ATTN_CASES)
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_attention_equals_dense_reference(backend, window, chunk, n_global, packed):
    q, k, v, seq_idx = _attention_inputs(seed=window + chunk + n_global)
    seq_idx = seq_idx if packed else None
    kwargs = {"window": window, "n_global": n_global}
    if backend == "flex":  # FlexAttention has no backward on CPU: the forward only
        summaries = _summaries(k, v, seq_idx, chunk)
        ref = sparse_global_attention_dense_ref(q, k, v, summaries, seq_idx=seq_idx, **kwargs)
        out = sparse_global_attention(q, k, v, summaries, seq_idx=seq_idx, backend="flex", **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        return
    _assert_backend_matches_dense_ref("torch", q, k, v, seq_idx, chunk, **kwargs)


@pytest.mark.filterwarnings(FLEX_EAGER)
def test_flex_without_summaries_and_fp32() -> None:
    q, k, v, seq_idx = _attention_inputs(seed=13)
    ref = sparse_global_attention_dense_ref(q, k, v, None, window=6, n_global=2, seq_idx=seq_idx)
    q, k, v = q.float(), k.float(), v.float()
    flex = sparse_global_attention(
        q, k, v, None, window=6, n_global=2, seq_idx=seq_idx, backend="flex"
    )
    assert flex.dtype == torch.float32
    torch.testing.assert_close(flex, ref.float(), rtol=1e-5, atol=1e-5)  # fp32 rounding


def _flash_varlen_stand_in(
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """Dense flash_attn_varlen_func: documents given by cu_seqlens, causal, window (left, right).

    Like flash-attn, the returned softmax_lse ([H, total]) carries no gradient.
    """
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and window_size[1] == 0
    total, H, _ = q.shape
    seg = torch.zeros(total, dtype=torch.long)
    seg[cu_q[1:-1].long()] = 1
    seg = seg.cumsum(0)
    assert int((cu_q[1:] - cu_q[:-1]).max()) == max_q
    pos = torch.arange(total) - cu_q.long()[seg]
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    if window_size[0] >= 0:
        mask &= pos[:, None] - pos[None, :] <= window_size[0]
    rep = H // k.shape[1]
    scores = torch.einsum("thk,shk->hts", q, k.repeat_interleave(rep, 1)) * softmax_scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("hts,shk->thk", scores.softmax(-1), v.repeat_interleave(rep, 1))
    if return_attn_probs:
        return out, torch.logsumexp(scores, -1).detach(), None
    return out


def _assert_backend_matches_dense_ref(
    backend: str,
    q,
    k,
    v,
    seq_idx,
    chunk: int,
    **kwargs,  # noqa: ANN001
) -> None:
    """Output and q/k/v gradients of ``backend`` equal the dense reference's (fp64, 1e-10)."""
    out_ref, g_ref = _attention_grads(
        sparse_global_attention_dense_ref, q, k, v, seq_idx, chunk, **kwargs
    )
    on_backend = lambda *a, **kw: sparse_global_attention(*a, backend=backend, **kw)  # noqa: E731
    out, g = _attention_grads(on_backend, q, k, v, seq_idx, chunk, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip("qkv", g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def _attention_grads(fn, q, k, v, seq_idx, chunk, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    summaries = _summaries(leaves[1], leaves[2], seq_idx, chunk)  # grads reach k, v through them
    out = fn(*leaves, summaries, seq_idx=seq_idx, **kwargs)
    grad_out = torch.randn(out.shape, generator=_gen(7), dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * grad_out).sum(), leaves)


@pytest.mark.parametrize("window,chunk,n_global", [(8, 4, 3), (5, 3, 1), (16, 4, 0)])
def test_flash_path_with_stand_in_kernel_matches_forward_and_backward(
    monkeypatch, window, chunk, n_global
) -> None:
    monkeypatch.setattr(flash_mod, "_load_flash_varlen", lambda: _flash_varlen_stand_in)
    q, k, v, seq_idx = _attention_inputs()
    kwargs = {"window": window, "n_global": n_global}
    _assert_backend_matches_dense_ref("flash_attn", q, k, v, seq_idx, chunk, **kwargs)


def test_flash_lse_gradient_is_needed(monkeypatch) -> None:
    """Without the restored LSE gradient the merge is differentiated wrongly (the test can fail)."""
    monkeypatch.setattr(flash_mod, "_load_flash_varlen", lambda: _flash_varlen_stand_in)
    q, k, v, seq_idx = _attention_inputs()
    _, g_ref = _attention_grads(
        sparse_global_attention_dense_ref, q, k, v, seq_idx, 4, window=8, n_global=3
    )
    monkeypatch.setattr(flash_mod._LocalLSE, "apply", lambda q, k, lse, attend, scale: lse)
    flash = flash_mod.sparse_global_attention_flash
    _, g = _attention_grads(flash, q, k, v, seq_idx, 4, window=8, n_global=3)
    assert not torch.allclose(g[0], g_ref[0], atol=1e-3)


def test_attention_unknown_or_missing_backend(monkeypatch) -> None:
    q, k, v, _ = _attention_inputs(T=6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        sparse_global_attention(q, k, v, None, window=4, n_global=0, backend="sdpa")
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(BackendUnavailableError, match="flash_attn"):
        sparse_global_attention(q, k, v, None, window=4, n_global=0, backend="flash_attn")


# ---------------------------------------------------------------------------------- model


def _backends_by_op(model: torch.nn.Module) -> dict[str, set[str]]:
    by_op: dict[str, set[str]] = {}
    for module in model.modules():
        if hasattr(type(module), "kernel_op"):
            by_op.setdefault(module.kernel_op, set()).add(module.kernel_backend)
    return by_op


@pytest.mark.filterwarnings(FLEX_EAGER)
def test_select_and_apply_backends_on_a_model() -> None:
    model = build_from_config("hydra-tiny.yaml").eval()
    ids = random_tokens(model, 2, 80)
    seq_idx = torch.tensor([[0] * 50 + [1] * 30, [0] * 80])
    with torch.no_grad():
        before = model(ids, seq_idx=seq_idx).logits
    all_torch = {"ssd": {"torch"}, "pkm": {"torch"}, "moe": {"torch"}, "attention": {"torch"}}
    assert _backends_by_op(model) == all_torch  # the default

    # the model built on the torch backend is the reference of the other CPU backends here (each
    # op's torch path is checked against an independent reference by the tests above)
    apply_kernel_backends(model, {"moe": "grouped_mm", "attention": "flex"})
    assert _backends_by_op(model) == all_torch | {"moe": {"grouped_mm"}, "attention": {"flex"}}
    with torch.no_grad():
        after = model(ids, seq_idx=seq_idx).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

    # what the trainer does: resolve the config's request (auto is torch on CPU), then point the
    # modules at it; this also sets the ops that were pointed elsewhere back to torch
    chosen = select_backends({"ssd": "auto", "pkm": "auto", "moe": "auto"}, "cpu")
    assert chosen == dict.fromkeys(BACKENDS, "torch")
    apply_kernel_backends(model, chosen)
    assert _backends_by_op(model) == all_torch

    with pytest.raises(ValueError, match="auto"):
        apply_kernel_backends(model, {"ssd": "auto"})
    with pytest.raises(ValueError, match="unknown kernel op"):
        apply_kernel_backends(model, {"conv": "torch"})
