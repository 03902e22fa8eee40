"""The fused C++ CPU kernels (``kernels/cpu``): built once and cached, selected by
``HYDRA_CPU_KERNELS``, a failed build falls back to the PyTorch ops with a warning, loading them
leaves the process's floating-point mode alone, results do not depend on the thread count, and
sequences longer than a tile (documents, carried-in state) match the references forward and
backward. ``tests/pretrain/test_fused_elementwise.py`` runs the ops' own tests on both forms."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kernels.cpu import native
from kernels.ssd import document_ids
from pretrain.models.common.causal_conv import causal_conv_silu, causal_conv_silu_ref
from pretrain.models.common.fused_norm import rms_norm, rms_norm_ref


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty kernel cache and no library loaded yet; the process's own is restored after."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(native.ENV, "native")
    native._load.cache_clear()
    yield tmp_path / "cache"
    native._load.cache_clear()


def test_builds_once_into_the_cache_and_reuses_it(fresh_build: Path) -> None:
    kernels = native.native_kernels()
    assert kernels is not None and kernels.path.parent == fresh_build
    built = kernels.path.stat().st_mtime_ns
    assert [p.name for p in fresh_build.iterdir()] == [kernels.path.name]  # no temporaries left
    native._load.cache_clear()
    again = native.native_kernels()
    assert again is not None and again.path == kernels.path
    assert again.path.stat().st_mtime_ns == built


def test_a_failed_build_warns_and_the_pytorch_ops_run(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.native_kernels() is None
    assert "fused CPU kernels unavailable" in caplog.text and "false" in caplog.text
    x, w, b = torch.randn(1, 9, 4, requires_grad=True), torch.randn(4, 4), torch.randn(4)
    torch.testing.assert_close(causal_conv_silu(x, w, b), causal_conv_silu_ref(x, w, b))


def test_mode_torch_never_builds(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "torch")
    assert native.native_kernels() is None
    assert native.runs_natively(torch.randn(3)) is None
    assert not fresh_build.exists()


def test_a_bad_mode_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ValueError, match="HYDRA_CPU_KERNELS='fast'"):
        native.native_kernels()


def test_only_cpu_float_tensors_of_one_dtype_run_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "native")
    f32, f64 = torch.randn(2), torch.randn(2, dtype=torch.float64)
    assert native.runs_natively(f32, None, f32) is not None
    assert native.runs_natively(f64) is not None
    assert native.runs_natively(f32, f64) is None
    assert native.runs_natively(f32.bfloat16()) is None
    assert native.runs_natively(torch.randn(2, device="meta")) is None


def test_a_group_size_that_does_not_divide_the_width_is_refused() -> None:
    with pytest.raises(ValueError, match="group_size 4 does not divide the width 10"):
        rms_norm(torch.randn(3, 10), torch.ones(10), 1e-5, group_size=4)


def test_loading_leaves_denormals_alone() -> None:
    """-ffast-math at link time would turn on flush-to-zero for the whole process at load."""
    assert native.native_kernels() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # a denormal
    assert (tiny * 2).item() > 0
    assert (tiny + tiny).item() == pytest.approx(2e-40, rel=1e-3)


def _conv_case(dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Three tiles of time and a ragged fourth, documents crossing tile edges, a prefix."""
    B, T, X, K = 2, 3 * 64 + 17, 19, 4
    wide = torch.randn(B, T, 2 * X, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(X, K, generator=gen, dtype=dtype).requires_grad_()
    bias = torch.randn(X, generator=gen, dtype=dtype).requires_grad_()
    prefix = torch.randn(B, K - 1, X, generator=gen, dtype=dtype).requires_grad_()
    seq_idx = torch.zeros(B, T, dtype=torch.long)
    seq_idx[0, 63:] = 1  # a document starts one row before a tile edge
    seq_idx[0, 130:] = 2
    seq_idx[1, 64:] = 1  # ... and exactly at one
    args = (wide[..., X:], weight, bias, prefix, document_ids(seq_idx))
    return args, [wide, weight, bias, prefix]


def _norm_case(dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Rows over several tiles and a ragged last one, a strided gate, groups."""
    N, E = 3 * 32 + 5, 24
    x = torch.randn(N, E, generator=gen, dtype=dtype).requires_grad_()
    wide = torch.randn(N, 2 * E, generator=gen, dtype=dtype).requires_grad_()
    weight = torch.randn(E, generator=gen, dtype=dtype).requires_grad_()
    return (x, weight, wide[:, E:]), [x, weight, wide]


def _outputs_and_grads(fn, args: tuple, leaves: list[torch.Tensor], **kw) -> list[torch.Tensor]:  # noqa: ANN001
    out = fn(*args, **kw)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out, *torch.autograd.grad(out, leaves, grad_out)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_conv_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "native")
    args, leaves = _conv_case(dtype, torch.Generator().manual_seed(0))
    assert native.runs_natively(*args[:4]) is not None
    got = _outputs_and_grads(causal_conv_silu, args, leaves)
    want = _outputs_and_grads(causal_conv_silu_ref, args, leaves)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_long_norm_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "native")
    (x, weight, gate), leaves = _norm_case(dtype, torch.Generator().manual_seed(1))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for kw, used in (({"gate": gate, "group_size": 8}, leaves), ({}, leaves[:2])):
        got = _outputs_and_grads(rms_norm, (x, weight, 1e-5), used, **kw)
        want = _outputs_and_grads(rms_norm_ref, (x, weight, 1e-5), used, **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_results_do_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.ENV, "native")
    gen = torch.Generator().manual_seed(2)
    conv_args, conv_leaves = _conv_case(torch.float32, gen)
    (x, weight, gate), norm_leaves = _norm_case(torch.float32, gen)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            conv = _outputs_and_grads(causal_conv_silu, conv_args, conv_leaves)
            norm = _outputs_and_grads(
                rms_norm, (x, weight, 1e-5), norm_leaves, gate=gate, group_size=8
            )
            runs.append(conv + norm)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
