"""The chunked SSD scan against its sequential definition (fp64), plus resets, states, bf16."""

from __future__ import annotations

import pytest
import torch

from kernels.ssd import ssd_scan_chunked, ssd_scan_sequential

F64 = torch.float64


def make_inputs(
    b: int = 2,
    T: int = 16,
    H: int = 4,
    P: int = 3,
    G: int = 1,
    N: int = 5,
    dtype: torch.dtype = F64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)

    return {
        "x": randn(b, T, H, P),
        "dt": (torch.rand(b, T, H, generator=gen, dtype=F64) * 0.5 + 0.05).to(dtype),
        # strong and weak decays, A in fp32 or fp64 as the kernels expect
        "A": -(torch.rand(H, generator=gen, dtype=F64) * 3 + 0.1).to(
            torch.promote_types(dtype, torch.float32)
        ),
        "B": randn(b, T, G, N),
        "C": randn(b, T, G, N),
    }


def packed_seq_idx(b: int, T: int, seed: int) -> torch.Tensor:
    """[b, T] non-decreasing document ids with a few random boundaries per row (some length 1)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, T, generator=gen) < 0.2
    starts[:, 0] = False
    starts[0, T // 2] = True
    starts[-1, T - 1] = True  # a document of length 1 at the very end
    return starts.long().cumsum(dim=1) + 7  # ids need not start at 0


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_chunked_matches_sequential(chunk: int, T: int, G: int) -> None:
    inp = make_inputs(T=T, G=G, seed=chunk * 100 + T + G)
    y_ref, h_ref = ssd_scan_sequential(**inp)
    y, h = ssd_scan_chunked(**inp, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    assert y.dtype == F64 and h.dtype == F64


@pytest.mark.parametrize("chunk", [4, 16])
def test_initial_state_and_resets(chunk: int) -> None:
    T = 33
    inp = make_inputs(T=T, G=2, seed=3)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    seq_idx = packed_seq_idx(2, T, seed=4)
    y_ref, h_ref = ssd_scan_sequential(**inp, initial_state=h0, seq_idx=seq_idx)
    y, h = ssd_scan_chunked(**inp, chunk_size=chunk, initial_state=h0, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    # the initial state matters (else the test above could not tell it was ignored)
    y0, _ = ssd_scan_chunked(**inp, chunk_size=chunk, seq_idx=seq_idx)
    assert (y0 - y).abs().max() > 1e-3


def _slice(
    inp: dict[str, torch.Tensor], row: int, start: int, stop: int
) -> dict[str, torch.Tensor]:
    return {k: v if k == "A" else v[row : row + 1, start:stop] for k, v in inp.items()}


@pytest.mark.parametrize("scan", ["sequential", "chunked"])
def test_packed_row_equals_documents_alone(scan: str) -> None:
    T = 40
    inp = make_inputs(T=T, G=2, seed=5)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    seq_idx = packed_seq_idx(2, T, seed=6)

    def run(**kw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if scan == "sequential":
            return ssd_scan_sequential(**kw)
        return ssd_scan_chunked(**kw, chunk_size=8)

    y, h = run(**inp, initial_state=h0, seq_idx=seq_idx)
    for row in range(2):
        ids = seq_idx[row]
        bounds = [0] + (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist() + [T]
        assert len(bounds) > 3, "the test wants several documents per row"
        for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            init = h0[row : row + 1] if d == 0 else None  # the initial state: first document only
            y_doc, h_doc = run(**_slice(inp, row, s, e), initial_state=init)
            torch.testing.assert_close(y[row : row + 1, s:e], y_doc, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h[row : row + 1], h_doc, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 5, 8, 20, 32])
@pytest.mark.parametrize("with_docs", [False, True])
def test_state_round_trip(split: int, with_docs: bool) -> None:
    T = 33
    inp = make_inputs(T=T, G=2, seed=7)
    h0 = torch.randn(2, 4, 3, 5, dtype=F64)
    seq_idx = packed_seq_idx(2, T, seed=8) if with_docs else None
    y, h = ssd_scan_chunked(**inp, chunk_size=8, initial_state=h0, seq_idx=seq_idx)
    first = {k: v if k == "A" else v[:, :split] for k, v in inp.items()}
    second = {k: v if k == "A" else v[:, split:] for k, v in inp.items()}
    sid_a = sid_b = None
    if with_docs:
        sid_a, sid_b = seq_idx[:, :split], seq_idx[:, split:]
    y_a, h_a = ssd_scan_chunked(**first, chunk_size=8, initial_state=h0, seq_idx=sid_a)
    # a document starting exactly at the split must not see the carried state
    carry = h_a
    if with_docs:
        continues = (sid_b[:, 0] == sid_a[:, -1]).to(F64)[:, None, None, None]
        carry = h_a * continues
    y_b, h_b = ssd_scan_chunked(**second, chunk_size=8, initial_state=carry, seq_idx=sid_b)
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_b, h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_docs", [False, True])
def test_gradients_match_sequential(with_docs: bool) -> None:
    T = 19
    inp = make_inputs(T=T, G=2, seed=9)
    inp["initial_state"] = torch.randn(2, 4, 3, 5, dtype=F64)
    for v in inp.values():
        v.requires_grad_(True)
    seq_idx = packed_seq_idx(2, T, seed=10) if with_docs else None
    gen = torch.Generator().manual_seed(11)
    w_y = torch.randn(2, T, 4, 3, generator=gen, dtype=F64)
    w_h = torch.randn(2, 4, 3, 5, generator=gen, dtype=F64)
    names = list(inp)

    def grads(y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = (y * w_y).sum() + (h * w_h).sum()
        return torch.autograd.grad(loss, [inp[k] for k in names])

    g_ref = grads(*ssd_scan_sequential(**inp, seq_idx=seq_idx))
    g = grads(*ssd_scan_chunked(**inp, chunk_size=8, seq_idx=seq_idx))
    for name, a, b in zip(names, g, g_ref):
        assert torch.isfinite(a).all(), name
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_bf16_inputs_close_to_fp32() -> None:
    T = 70  # several chunks, the last one partial
    inp32 = make_inputs(T=T, G=2, dtype=torch.float32, seed=12)
    seq_idx = packed_seq_idx(2, T, seed=13)
    inp16 = {k: v if k == "A" else v.to(torch.bfloat16) for k, v in inp32.items()}
    # same values in both runs: compare the arithmetic, not the input rounding
    inp32 = {k: v.float() for k, v in inp16.items()}
    y32, h32 = ssd_scan_chunked(**inp32, chunk_size=16, seq_idx=seq_idx)
    y16, h16 = ssd_scan_chunked(**inp16, chunk_size=16, seq_idx=seq_idx)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert torch.isfinite(y16).all() and torch.isfinite(h16).all()
    torch.testing.assert_close(h16, h32, rtol=1e-5, atol=1e-5)  # state accumulated in fp32
    torch.testing.assert_close(y16.float(), y32, rtol=1.6e-2, atol=1e-2)


def test_long_decay_stays_finite() -> None:
    """Large accumulated decay (|sum dt*A| in the thousands) must not overflow or give NaN."""
    inp = make_inputs(T=64, G=1, dtype=torch.float32, seed=14)
    inp["dt"] = inp["dt"] * 20
    inp["A"] = inp["A"] * 10
    y, h = ssd_scan_chunked(**inp, chunk_size=32)
    y_ref, h_ref = ssd_scan_sequential(**inp)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise() -> None:
    inp = make_inputs(T=8, G=1)
    with pytest.raises(ValueError, match="n_groups"):
        ssd_scan_chunked(
            **{**inp, "B": inp["B"].repeat(1, 1, 3, 1), "C": inp["C"].repeat(1, 1, 3, 1)},
            chunk_size=4,
        )
    with pytest.raises(ValueError, match="initial_state"):
        ssd_scan_chunked(**inp, chunk_size=4, initial_state=torch.zeros(2, 4, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="seq_idx"):
        ssd_scan_chunked(**inp, chunk_size=4, seq_idx=torch.zeros(2, 7, dtype=torch.long))
