"""Attention modules: causality, packed documents, gradients, bf16, and SGA vs full attention."""

from __future__ import annotations

import pytest
import torch

from pretrain.models.common.attention import CausalSelfAttention, SparseGlobalAttention
from pretrain.models.config import AttentionConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D = 32
# window 8, chunks of 4, 3 summaries: at T = 40 late queries see summaries and a window
CFG = AttentionConfig(n_heads=4, n_kv_heads=2, window=8, summary_chunk=4, n_global=3)
MODULES = [SparseGlobalAttention, CausalSelfAttention]


def _build(cls, cfg: AttentionConfig = CFG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(D, cfg)


@pytest.mark.parametrize("cls", MODULES)
@pytest.mark.parametrize("packed", [False, True])
def test_causal(cls, packed):
    mod = _build(cls)
    gen = torch.Generator().manual_seed(1)
    B, T = 2, 40
    x = torch.randn(B, T, D, generator=gen)
    seq_idx = torch.tensor([[0] * 17 + [1] * 23, [0] * 40]) if packed else None
    base = mod(x, seq_idx)
    for t in (0, 11, 16, 29, 38):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn(B, T - t - 1, D, generator=gen)
        out = mod(x2, seq_idx)
        assert (out[:, : t + 1] - base[:, : t + 1]).abs().max() <= 1e-6
        assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-4  # the perturbation matters


@pytest.mark.parametrize("cls", MODULES)
def test_packed_equals_separate_documents(cls):
    mod = _build(cls)
    gen = torch.Generator().manual_seed(2)
    rows = [[13, 20, 7], [1, 30, 9], [40]]  # boundaries off the chunk and window grids
    T = 40
    x = torch.randn(len(rows), T, D, generator=gen)
    seq_idx = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(r)]) for r in rows])
    packed = mod(x, seq_idx)
    for row, lengths in enumerate(rows):
        offset = 0
        for n in lengths:
            alone = mod(x[row : row + 1, offset : offset + n])
            torch.testing.assert_close(
                packed[row : row + 1, offset : offset + n], alone, rtol=1e-5, atol=1e-5
            )
            offset += n


def test_sga_with_window_over_t_is_full_causal_attention():
    """Two independent paths (blocked kernel vs SDPA) agree where their definitions coincide."""
    cfg = AttentionConfig(n_heads=4, n_kv_heads=2, window=64, summary_chunk=4, n_global=3)
    sga, full = _build(SparseGlobalAttention, cfg), _build(CausalSelfAttention, cfg)
    full.load_state_dict(sga.state_dict())
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(3))
    seq_idx = torch.tensor([[0] * 17 + [1] * 23, [5] * 40])
    for s in (None, seq_idx):
        torch.testing.assert_close(sga(x, s), full(x, s), rtol=1e-5, atol=1e-5)


def test_sga_summaries_carry_information_from_before_the_window():
    """A token long before the window reaches late queries only through the summaries."""
    x = torch.randn(1, 40, D, generator=torch.Generator().manual_seed(4))
    x2 = x.clone()
    x2[:, 2] += 1.0  # chunk 0 (positions 0..3); query 39 sees window 32..39
    for n_global, changes in ((3, False), (10, True)):  # query 39 keeps chunks 5..7 or 0..7
        cfg = AttentionConfig(n_heads=4, n_kv_heads=2, window=8, summary_chunk=4, n_global=n_global)
        mod = _build(SparseGlobalAttention, cfg)
        delta = (mod(x2) - mod(x))[0, 39].abs().max()
        assert (delta > 1e-6) == changes, (n_global, delta)


@pytest.mark.parametrize("cls", MODULES)
def test_gradients_reach_every_parameter(cls):
    mod = _build(cls)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(5), requires_grad=True)
    seq_idx = torch.tensor([[0] * 17 + [1] * 23, [0] * 40])
    mod(x, seq_idx).pow(2).sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", MODULES)
def test_bf16_autocast(cls):
    mod = _build(cls)
    x = torch.randn(2, 40, D, generator=torch.Generator().manual_seed(6))
    seq_idx = torch.tensor([[0] * 17 + [1] * 23, [0] * 40])
    ref = mod(x, seq_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(x, seq_idx)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters())
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("cls", MODULES)
def test_init_weights(cls):
    mod = _build(cls, CFG)
    for p in mod.parameters():
        torch.nn.init.zeros_(p)
    mod.init_weights(0.1)
    for name, p in mod.named_parameters():
        assert 0.08 < p.std().item() < 0.115 and p.abs().max() <= 0.3 + 1e-6, name
