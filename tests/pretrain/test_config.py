"""The config system: unknown keys, wrong types, impossible values, cross-field problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config, parse_overrides
from pretrain.models import build_model
from pretrain.models.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.d_model > 0


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(None, ["model.d_model=64", "train.lr=1e-3", "model.pkm.after_blocks=[1,2]"])
    assert cfg.model.d_model == 64 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.pkm.after_blocks == [1, 2]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_key_names_dotted_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.ssm\.d_stat'.*d_state"):
        load_config(None, ["model.ssm.d_stat=3"])


def test_wrong_type_names_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_layers: expected an integer"):
        load_config(None, ["model.n_layers=two"])
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings: expected true or false"):
        load_config(None, ["model.tie_embeddings=1"])


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"model\.moe\.routing.*\['chunk', 'token'\]"):
        load_config(None, ["model.moe.routing=sequence"])


def test_impossible_values_fail_before_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    import pretrain.models.lm as lm

    def must_not_build(*args, **kwargs):  # pragma: no cover - reached only on failure
        raise AssertionError("model construction started before validation")

    cfg = ModelConfig(d_model=96)
    cfg.attention.n_heads = 5
    monkeypatch.setattr(lm.CausalLM, "__init__", must_not_build)
    with pytest.raises(ConfigError, match=r"model\.attention\.n_heads: 5 does not divide"):
        build_model(cfg)


def test_all_cross_field_problems_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            ["model.attention.n_heads=7", "model.ssm.head_dim=48", "train.seq_len=999999"],
        )
    message = str(info.value)
    for key in ("model.attention.n_heads", "model.ssm.head_dim", "train.seq_len"):
        assert key in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_host_sized_moe_is_refused_with_compile_and_checkpointing() -> None:
    """The torch expert loop under compile + activation checkpointing fails its first backward
    (CheckpointError): refused up front, naming the key and the backend that works."""
    both = ["train.compile=true", "train.activation_checkpointing=true"]
    with pytest.raises(ConfigError, match=r"kernels\.moe=torch .*kernels\.moe=grouped_mm"):
        load_config(CONFIG_DIR / "hydra-tiny.yaml", [*both, "kernels.moe=torch"])
    load_config(CONFIG_DIR / "hydra-tiny.yaml", [*both, "kernels.moe=grouped_mm"])
    load_config(CONFIG_DIR / "hydra-tiny.yaml", [*both])  # auto: grouped_mm when compiled
    load_config(CONFIG_DIR / "hydra-tiny.yaml", ["train.compile=true", "kernels.moe=torch"])
    load_config(CONFIG_DIR / "mamba2-29m.yaml", [*both, "kernels.moe=torch"])  # no MoE
