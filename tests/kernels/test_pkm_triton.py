"""Triton PKM bag (``kernels/pkm/triton.py``) vs ``pkm_lookup_ref``, run in Triton's interpreter.

Every kernel-written output is allocated NaN-filled here (``_new_output`` is patched), so an
element a kernel forgets to write fails the comparison. Inputs are fresh random draws; the seed is
printed so a failure can be replayed with ``PKM_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import os

# The kernels choose interpreter or GPU compilation when they are decorated, i.e. when
# kernels.pkm.triton is imported: set the switch before that import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import kernels.pkm.triton as pkm_triton  # noqa: E402
from kernels.pkm.ref import pkm_lookup_ref  # noqa: E402
from kernels.pkm.triton import pkm_lookup_triton  # noqa: E402

ON_CPU_INTERPRETER = pkm_triton.INTERPRET
if ON_CPU_INTERPRETER:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    raise RuntimeError(
        "kernels.pkm.triton was imported before TRITON_INTERPRET=1 was set and there is no GPU:"
        " set the variable before anything imports the Triton PKM kernels"
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_filled(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(pkm_triton, "_new_output", nan_filled)


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("PKM_TEST_SEED", torch.seed() % 2**31))
    print(f"PKM_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def _inputs(
    gen: torch.Generator, rows: int, d_value: int, n: int, k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """values [R, Dv], indices [n, k] (with a row repeated inside bag 0), weights, cotangent."""
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    values = torch.randn(rows, d_value, generator=gen).to(dtype)
    # only the first half of the rows is ever read, so the rest must get exactly zero gradient
    indices = torch.randint(0, max(1, rows // 2), (n, k), generator=gen)
    if n > 0 and k > 1:
        indices[0, 1] = indices[0, 0]
    weights = torch.rand(n, k, generator=gen).to(w_dtype)
    cot = torch.randn(n, d_value, generator=gen).to(dtype)
    return (t.to(DEVICE) for t in (values, indices, weights, cot))


def _run(fn, values, indices, weights, cot, **kwargs):  # noqa: ANN001, ANN202
    v = values.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = fn(v, indices, w, **kwargs)
    (out.double() * cot.double()).sum().backward()
    return out, v.grad, w.grad


def _exact(values, indices, weights, cot):  # noqa: ANN001, ANN202
    """fp64 dense gather-and-sum of the same inputs: an independent second reference."""
    return _run(
        lambda v, i, w: (v.double()[i] * w.double()[..., None]).sum(dim=1),
        values.double(),
        indices,
        weights.double(),
        cot,
    )


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    ("rows", "d_value", "n", "k"),
    [(40, 7, 13, 6), (64, 130, 33, 3), (9, 16, 1, 1), (30, 33, 70, 5)],
)
def test_matches_reference_fp32(
    gen: torch.Generator, rows: int, d_value: int, n: int, k: int, deterministic: bool
) -> None:
    values, indices, weights, cot = _inputs(gen, rows, d_value, n, k, torch.float32)
    got = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=deterministic)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    exact = _exact(values, indices, weights, cot)
    for name, g, w, e in zip(("out", "grad_values", "grad_weights"), got, want, exact):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=name)
    unread = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    unread[indices.flatten()] = False
    assert unread.any()
    assert bool((got[1][unread] == 0).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference_fp64(gen: torch.Generator, deterministic: bool) -> None:
    values, indices, weights, cot = _inputs(gen, 24, 20, 37, 4, torch.float64)
    got = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=deterministic)
    for g, w in zip(got, _exact(values, indices, weights, cot)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64(gen: torch.Generator) -> None:
    values, indices, weights, _ = _inputs(gen, 6, 5, 3, 4, torch.float64)
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda v, w, det=det: pkm_lookup_triton(v, indices, w, deterministic=det),
            (values.clone().requires_grad_(), weights.clone().requires_grad_()),
        )


@pytest.mark.parametrize("deterministic", [False, True])
def test_bf16_values(gen: torch.Generator, deterministic: bool) -> None:
    values, indices, weights, cot = _inputs(gen, 32, 40, 19, 8, torch.bfloat16)
    got = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=deterministic)
    exact = _exact(values, indices, weights, cot)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    # fp32 sums rounded once to bf16: within half a bf16 ulp of the exact result on the GPU
    # (round to nearest even); Triton's interpreter truncates fp32 -> bf16 instead: one ulp
    rtol = 2**-7 if ON_CPU_INTERPRETER else 2**-8
    for g, e in zip(got[:2], exact[:2]):
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(got[2].double(), exact[2], rtol=1e-5, atol=1e-5)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    for i in (0, 2):
        torch.testing.assert_close(got[i].float(), want[i].float(), rtol=2e-2, atol=2e-2)
    # the bf16 reference sums grad_values in bf16 (each add rounded, weights rounded to bf16
    # first), so it agrees with the exact sum only to its own error: compare within that
    ref_err = (want[1].double() - exact[1]).abs().max().item()
    ulp = 2**-7 * exact[1].abs().max().item()
    torch.testing.assert_close(got[1].double(), want[1].double(), rtol=0, atol=ref_err + ulp)


def test_deterministic_equals_atomic_bitwise(gen: torch.Generator) -> None:
    """Small integers times powers of two: every partial sum is exact, so any order agrees."""
    rows, d_value, n, k = 12, 150, 40, 7  # few rows: many bags share each row
    values = torch.randint(-8, 9, (rows, d_value), generator=gen).float().to(DEVICE)
    indices = torch.randint(0, rows, (n, k), generator=gen).to(DEVICE)
    weights = (torch.randint(1, 5, (n, k), generator=gen).float() / 4).to(DEVICE)
    cot = torch.randint(-4, 5, (n, d_value), generator=gen).float().to(DEVICE)
    atomic = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=False)
    sorted_ = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=True)
    again = _run(pkm_lookup_triton, values, indices, weights, cot, deterministic=True)
    ref = _run(pkm_lookup_ref, values, indices, weights, cot)
    for a, s, s2, r in zip(atomic, sorted_, again, ref):
        assert torch.equal(a, s) and torch.equal(s, s2) and torch.equal(s, r)


def test_default_follows_torch_deterministic_switch(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    values, indices, weights, cot = _inputs(gen, 10, 8, 6, 3, torch.float32)
    calls = []
    real = pkm_triton._bag_backward_sorted
    monkeypatch.setattr(pkm_triton, "_bag_backward_sorted", lambda *a: calls.append(1) or real(*a))
    _run(pkm_lookup_triton, values, indices, weights, cot)
    assert not calls
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    _run(pkm_lookup_triton, values, indices, weights, cot)
    assert calls


def test_single_input_gradients_and_int32_indices(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 20, 9, 11, 4, torch.float32)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    for det in (False, True):
        v = values.clone().requires_grad_()
        out = pkm_lookup_triton(v, indices.int(), weights, deterministic=det)
        (out * cot).sum().backward()
        torch.testing.assert_close(v.grad, want[1], rtol=1e-5, atol=1e-5)
        w = weights.clone().requires_grad_()
        (pkm_lookup_triton(values, indices, w, deterministic=det) * cot).sum().backward()
        torch.testing.assert_close(w.grad, want[2], rtol=1e-5, atol=1e-5)


def test_strided_table(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 16, 12, 9, 3, torch.float32)
    table_t = values.t().contiguous().t()  # same values, strides (1, R)
    assert table_t.stride() != values.stride()
    got = _run(pkm_lookup_triton, table_t, indices, weights, cot)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_empty_bags(gen: torch.Generator) -> None:
    values = torch.randn(5, 4, generator=gen).to(DEVICE).requires_grad_()
    for n, k in ((0, 3), (4, 0)):
        indices = torch.zeros(n, k, dtype=torch.long, device=DEVICE)
        weights = torch.ones(n, k, device=DEVICE, requires_grad=True)
        out = pkm_lookup_triton(values, indices, weights)
        assert out.shape == (n, 4) and bool((out == 0).all())
        out.sum().backward()
        assert bool((values.grad == 0).all()) and weights.grad.shape == (n, k)


def test_under_bf16_autocast(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 16, 8, 10, 4, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _run(pkm_lookup_triton, values, indices, weights, cot)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_input_errors() -> None:
    values = torch.randn(5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        pkm_lookup_triton(values, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2))
    with pytest.raises(ValueError, match="int64 or int32"):
        pkm_lookup_triton(values, torch.zeros(2, 2), torch.ones(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_table_past_int32_offsets_on_gpu() -> None:
    """A [2^20 + 8, 2048] bf16 table has > 2^31 elements: rows near its end need int64 offsets."""
    rows, d_value = 2**20 + 8, 2048
    values = torch.zeros(rows, d_value, dtype=torch.bfloat16, device="cuda")
    values[-8:] = torch.arange(8, device="cuda", dtype=torch.bfloat16)[:, None]
    indices = torch.tensor([[rows - 1, rows - 2], [3, rows - 8]], device="cuda")
    weights = torch.ones(2, 2, device="cuda", requires_grad=True)
    v = values.requires_grad_()
    out = pkm_lookup_triton(v, indices, weights, deterministic=True)
    assert out[0].float().eq(13).all() and out[1].float().eq(0).all()
    out.float().sum().backward()
    assert v.grad[rows - 1].float().eq(1).all() and v.grad[5].float().eq(0).all()


def test_custom_ops_pass_opcheck(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 12, 10, 5, 3, torch.float32)
    torch.library.opcheck(torch.ops.hydra_kernels.pkm_bag_fwd, (values, indices, weights))
    for need_v, need_w, det in ((True, True, False), (True, False, True), (False, True, True)):
        torch.library.opcheck(
            torch.ops.hydra_kernels.pkm_bag_bwd,
            (values, indices, weights, cot, need_v, need_w, det),
        )


def test_compiles_without_graph_breaks(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 12, 10, 5, 3, torch.float32)
    compiled = torch.compile(pkm_lookup_triton, backend="aot_eager", fullgraph=True)
    got = _run(compiled, values, indices, weights, cot, deterministic=True)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_runs_under_torch_deterministic_algorithms(gen: torch.Generator) -> None:
    values, indices, weights, cot = _inputs(gen, 14, 9, 8, 3, torch.float32)
    want = _run(pkm_lookup_ref, values, indices, weights, cot)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = _run(pkm_lookup_triton, values, indices, weights, cot)  # picks the sorted path
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
