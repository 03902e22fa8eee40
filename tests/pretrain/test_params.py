"""Parameter accounts of the shipped configs (built on the meta device: no memory)."""

from __future__ import annotations

import pytest

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.cache import inference_cache_bytes
from pretrain.models.params import count_parameters
from tests.pretrain.model_helpers import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def _account(name: str):
    cfg = load_config(CONFIG_DIR / name)
    return count_parameters(build_model(cfg.model, device="meta"))


def test_29m_configs_match_the_paper_scale_and_each_other() -> None:
    hydra, transformer = _account("hydra-29m.yaml").total, _account("transformer-29m.yaml").total
    for total in (hydra, transformer):
        assert abs(total - 29e6) <= 0.05 * 29e6, total
    assert abs(hydra - transformer) <= 0.05 * transformer
    assert abs(_account("mamba2-29m.yaml").total - 29e6) <= 0.05 * 29e6


def test_1p6b_config_total_and_active() -> None:
    account = _account("hydra-1.6b.yaml")
    assert abs(account.total - 1.6e9) <= 0.03 * 1.6e9, account.total
    assert 0 < account.active < account.total  # MoE and PKM make only part of it active


def test_account_covers_every_parameter_once() -> None:
    account = _account("hydra-tiny.yaml")
    assert {"embedding", "ssm", "attention", "moe", "workspace", "pkm"} <= set(account.components)


def _meta_model(name: str, *overrides: str):
    cfg = load_config(CONFIG_DIR / name, list(overrides))
    return build_model(cfg.model, device="meta")


def test_transformer_kv_cache_is_every_key_and_value() -> None:
    model = _meta_model("transformer-29m.yaml")
    cfg = model.cfg
    kv_heads = cfg.attention.n_kv_heads or cfg.attention.n_heads
    head_dim = cfg.d_model // cfg.attention.n_heads
    for length in (1024, 8192, 65536):
        cache = inference_cache_bytes(model, length)
        assert cache["total"] == 2 * cfg.n_layers * kv_heads * head_dim * length * 2
        assert cache["ffn"] == 0
    # linear in the context: twice the tokens, twice the bytes
    assert (
        inference_cache_bytes(model, 2048)["total"]
        == 2 * inference_cache_bytes(model, 1024)["total"]
    )


def test_mamba2_cache_does_not_grow_with_the_context() -> None:
    model = _meta_model("mamba2-29m.yaml")
    short, long = inference_cache_bytes(model, 1024), inference_cache_bytes(model, 65536)
    assert short == long and short["total"] == short["ssm"] > 0
    ssm = model.cfg.ssm
    heads = ssm.expand * model.cfg.d_model // ssm.head_dim
    conv_dim = ssm.expand * model.cfg.d_model + 2 * ssm.n_groups * ssm.d_state
    per_layer = heads * ssm.head_dim * ssm.d_state * 4 + (ssm.d_conv - 1) * conv_dim * 2
    assert short["total"] == model.cfg.n_layers * per_layer


def test_hydra_cache_is_bounded_by_the_window_and_the_summaries() -> None:
    model = _meta_model("hydra-tiny.yaml")
    a = model.cfg.attention
    longest = a.window + a.n_global * a.summary_chunk
    assert inference_cache_bytes(model, longest) == inference_cache_bytes(model, 4 * longest)
    assert inference_cache_bytes(model, 1)["total"] < inference_cache_bytes(model, longest)["total"]
    assert {"ssm", "attention", "workspace"} <= set(inference_cache_bytes(model, 1))
