"""The Attamba family: chunk resets of the key/value scans, chunking per layer, cost, config."""

from __future__ import annotations

import pytest
import torch

from benchmarks._measure import LargestTensor
from kernels.attention import ref as attention_ref
from kernels.attention.boundary import boundary_slots
from pretrain.config import load_config, validate_run_config
from pretrain.config_errors import ConfigError
from pretrain.models.attamba.attention import AttambaAttention
from pretrain.models.common.sequence import SequenceContext
from tests.pretrain.model_helpers import CONFIG_DIR, build_from_config, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "attamba-tiny.yaml"


def _attention_layers(model) -> list[AttambaAttention]:
    return [m for m in model.modules() if isinstance(m, AttambaAttention)]


def test_cyclic_chunking_gives_each_layer_its_offset() -> None:
    model = build_from_config(TINY)
    assert [a.offset for a in _attention_layers(model)] == [0, 1, 2, 3]
    fixed = build_from_config(TINY, "model.attamba.chunking=fixed")
    assert [a.offset for a in _attention_layers(fixed)] == [0, 0, 0, 0]


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_key_value_scans_restart_at_every_chunk(layer: int) -> None:
    """A perturbation inside chunk c changes the keys and values of chunk c from that token on,
    and nothing in any other chunk (earlier boundaries included)."""
    model = build_from_config(TINY).eval()
    att = _attention_layers(model)[layer]
    P, offset, T = att.cfg.chunk_size, att.offset, 40
    seq_idx = torch.tensor([[0] * 17 + [1] * (T - 17)])  # a document starts mid-chunk
    context = SequenceContext.whole(seq_idx, 1, T, torch.device("cpu"))
    x = torch.randn(1, T, model.cfg.d_model, generator=torch.Generator().manual_seed(layer))
    doc_pos = context.doc_pos[0]
    chunk_of = torch.cumsum(
        (doc_pos == 0) | ((doc_pos >= offset) & ((doc_pos - offset) % P == 0)), 0
    )
    with torch.no_grad():
        k0, v0 = att.keys_values(x, context)
        for t in (5, 18, 30):
            bumped = x.clone()
            bumped[:, t] += 1.0
            k1, v1 = att.keys_values(bumped, context)
            same_chunk = chunk_of == chunk_of[t]
            changed = ((k1 - k0).abs().amax(dim=(0, 2, 3)) > 0) | (
                (v1 - v0).abs().amax(dim=(0, 2, 3)) > 0
            )
            assert not changed[~same_chunk].any(), (t, changed.nonzero().flatten().tolist())
            assert changed[t], t


def _largest_in_training_step(model, length: int) -> int:
    ids = random_tokens(model, 1, length)
    with LargestTensor() as probe:
        model(ids).logits.float().pow(2).mean().backward()
    return probe.numel


def test_largest_tensor_of_a_training_step_grows_linearly(monkeypatch) -> None:
    """No L x L tensor anywhere in the model: with the attention's score budget set below the
    size of one activation, 4x the length makes the largest tensor ~4x, not 16x, larger."""
    monkeypatch.setattr(attention_ref, "_SCORE_ELEMS_PER_GROUP", 1 << 14)
    model = build_from_config(TINY)
    small, large = _largest_in_training_step(model, 256), _largest_in_training_step(model, 1024)
    assert large <= 4.5 * small, (small, large)


def test_flop_count_sees_the_keys_the_op_shows() -> None:
    """The FLOP account's mean visible keys equals a count over the op's own boundary slots."""
    model = build_from_config(TINY)
    T = 96
    doc_pos = torch.arange(T)[None]
    for att in _attention_layers(model):
        P, lead = att.cfg.chunk_size, att.cfg.leading_tokens
        slots = boundary_slots(doc_pos, None, chunk=P, offset=att.offset, leading=lead)
        t = torch.arange(T)
        window = torch.clamp(t + 1, max=lead)
        seen = (slots.pos[0][None, :] <= (t - lead)[:, None]).sum(dim=1)
        assert att.visible_keys(T) == pytest.approx(float((window + seen).double().mean()))


def test_kv_cache_holds_boundaries_and_the_leading_window() -> None:
    model = build_from_config(TINY)
    att = _attention_layers(model)[0]
    per_token = 2 * att.n_kv_heads * att.head_dim * 2
    states = att.k_scan.cache_bytes(8192) + att.v_scan.cache_bytes(8192)
    # the next query (position 8192) sees 8 window tokens (7 cached, its own) and the
    # boundaries at or before 8184
    doc_pos = torch.arange(8193)[None]
    slots = boundary_slots(doc_pos, None, chunk=4, offset=att.offset, leading=8)
    needed = 7 + int((slots.pos[0] <= 8192 - 8).sum())
    assert att.cache_bytes(8192) == needed * per_token + states
    assert att.cache_bytes(16384) - att.cache_bytes(8192) == (8192 // 4) * per_token


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.attamba.chunking=variable", "model.attamba.chunking"),
        ("model.attamba.leading_tokens=0", "model.attamba.leading_tokens"),
        ("model.attamba.chunk_size=0", "model.attamba.chunk_size"),
        ("model.d_ff=0", "model.d_ff"),
        ("model.attention.n_heads=3", "model.attention.n_heads"),
        ("model.attamba.use_moe=true model.moe.enabled=false", "model.attamba.use_moe"),
    ],
)
def test_bad_attamba_configs_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = load_config(CONFIG_DIR / TINY, override.split())
        validate_run_config(cfg)


def test_context_parallel_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="parallel.cp=2: model.family=attamba"):
        load_config(CONFIG_DIR / TINY, ["parallel.cp=2", "parallel.backend=fsdp2"])
