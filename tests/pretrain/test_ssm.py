"""Mamba2Mixer: causality, packed documents, state round trip, gradients, bf16, fp32 parameters."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models.common.ssm import Mamba2Mixer, SSMState
from pretrain.models.config import SSMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL = 32


def make_mixer(seed: int = 0, **overrides: int) -> Mamba2Mixer:
    torch.manual_seed(seed)
    fields = {"d_state": 8, "head_dim": 8, "expand": 2, "n_groups": 2, "d_conv": 4, "chunk_size": 8}
    cfg = SSMConfig(**{**fields, **overrides})
    mixer = Mamba2Mixer(D_MODEL, cfg)
    # non-trivial conv bias, norm and D so that every path shows up in the outputs
    with torch.no_grad():
        for p in (mixer.norm.weight, mixer.D):
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def rand_x(b: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


def doc_seq_idx(T: int, starts: list[int]) -> torch.Tensor:
    flags = torch.zeros(T, dtype=torch.long)
    flags[starts] = 1
    return flags.cumsum(0)


def test_shapes_and_parameter_names() -> None:
    mixer = make_mixer()
    assert mixer.n_heads == 8 and mixer.d_inner == 64
    y, state = mixer(rand_x(2, 11), return_state=True)
    assert y.shape == (2, 11, D_MODEL)
    assert isinstance(state, SSMState)
    assert state.ssm.shape == (2, 8, 8, 8) and state.ssm.dtype == torch.float32
    assert state.conv.shape == (2, 3, mixer.conv_dim)
    names = {n for n, _ in mixer.named_parameters()}
    assert {"A_log", "D", "dt_bias", "conv1d.bias", "norm.weight"} <= names


def test_init_ranges() -> None:
    mixer = make_mixer()
    cfg = mixer.cfg
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= cfg.dt_min * (1 - 1e-5)).all() and (dt <= cfg.dt_max * (1 + 1e-5)).all()
    a = mixer.A_log.exp()
    assert (a >= cfg.a_init_min - 1e-5).all() and (a <= cfg.a_init_max + 1e-5).all()
    mixer.init_weights(0.01)
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(mixer.norm.weight, torch.ones_like(mixer.norm.weight))
    assert math.isclose(mixer.in_proj.weight.std().item(), 0.01, rel_tol=0.1)


@pytest.mark.parametrize("t", [0, 5, 12, 18])
def test_causal(t: int) -> None:
    mixer = make_mixer()
    x = rand_x(2, 19)
    seq_idx = doc_seq_idx(19, [6, 13]).expand(2, -1)
    for sid in (None, seq_idx):
        y = mixer(x, seq_idx=sid)
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :]) * 5
        y2 = mixer(x2, seq_idx=sid)
        assert torch.equal(y[:, : t + 1], y2[:, : t + 1])
        if t + 1 < 19:
            assert (y[:, t + 1 :] - y2[:, t + 1 :]).abs().max() > 1e-4


def test_packed_documents_equal_separate() -> None:
    mixer = make_mixer()
    T = 29
    starts = [1, 4, 17]  # a 1-token document, one shorter than the conv, ragged chunk ends
    x = rand_x(1, T)
    y = mixer(x, seq_idx=doc_seq_idx(T, starts)[None])
    bounds = [0, *starts, T]
    for s, e in zip(bounds[:-1], bounds[1:]):
        y_doc = mixer(x[:, s:e])
        torch.testing.assert_close(y[:, s:e], y_doc, rtol=1e-5, atol=1e-6)
    # without seq_idx the documents do mix (so the check above is not vacuous)
    assert (mixer(x)[:, 4:17] - y[:, 4:17]).abs().max() > 1e-4


@pytest.mark.parametrize("split", [1, 2, 7, 8, 13, 24])
@pytest.mark.parametrize("with_docs", [False, True])
def test_state_round_trip(split: int, with_docs: bool) -> None:
    mixer = make_mixer()
    T = 27  # not a multiple of the chunk (8)
    x = rand_x(2, T)
    seq_idx = None
    if with_docs:
        # no document starts at a split point: the carried states continue a document
        seq_idx = torch.stack([doc_seq_idx(T, [3, 10, 19]), doc_seq_idx(T, [6, 9, 23])])
        seq_idx = seq_idx + 5
    y, state = mixer(x, seq_idx=seq_idx, return_state=True)
    sid_a = sid_b = None
    if with_docs:
        sid_a, sid_b = seq_idx[:, :split], seq_idx[:, split:]
    y_a, st_a = mixer(x[:, :split], seq_idx=sid_a, return_state=True)
    y_b, st_b = mixer(
        x[:, split:],
        seq_idx=sid_b,
        initial_state=st_a.ssm,
        conv_state=st_a.conv,
        return_state=True,
    )
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_b.ssm, state.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_b.conv, state.conv, rtol=1e-5, atol=1e-6)


def test_three_segments_and_dropped_state_differs() -> None:
    mixer = make_mixer(d_conv=3, chunk_size=4)
    x = rand_x(1, 14)
    y = mixer(x)
    st = None
    outs = []
    for s, e in ((0, 5), (5, 6), (6, 14)):
        kw = {} if st is None else {"initial_state": st.ssm, "conv_state": st.conv}
        out, st = mixer(x[:, s:e], return_state=True, **kw)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), y, rtol=1e-5, atol=1e-6)
    # the carried state is what makes the continuation right
    assert (mixer(x[:, 6:]) - y[:, 6:]).abs().max() > 1e-4


def test_gradients_reach_every_parameter() -> None:
    mixer = make_mixer()
    x = rand_x(2, 13).requires_grad_(True)
    seq_idx = doc_seq_idx(13, [5]).expand(2, -1)
    mixer(x, seq_idx=seq_idx).pow(2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert x.grad is not None and x.grad.abs().max() > 0


def test_bf16_autocast() -> None:
    mixer = make_mixer()
    x = rand_x(2, 21) * 3
    seq_idx = doc_seq_idx(21, [9]).expand(2, -1)
    y32 = mixer(x, seq_idx=seq_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state = mixer(x, seq_idx=seq_idx, return_state=True)
        y16.float().pow(2).sum().backward()
    assert y16.dtype == torch.bfloat16
    assert torch.isfinite(y16).all()
    assert state.ssm.dtype == torch.float32 and torch.isfinite(state.ssm).all()
    for name in ("A_log", "D", "dt_bias"):
        p = getattr(mixer, name)
        assert p.dtype == torch.float32, name
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 5e-2


def test_meta_device_build_then_init() -> None:
    with torch.device("meta"):
        mixer = Mamba2Mixer(D_MODEL, SSMConfig(d_state=8, head_dim=8, chunk_size=8))
    mixer.to_empty(device="cpu")
    mixer.init_weights(0.02)
    y = mixer(rand_x(1, 9))
    assert torch.isfinite(y).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2Mixer(D_MODEL, SSMConfig(head_dim=12))
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Mixer(D_MODEL, SSMConfig(head_dim=8, n_groups=3))
