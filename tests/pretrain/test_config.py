"""The config system: unknown keys, wrong types, impossible values, cross-field problems."""

from __future__ import annotations

import re
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
    assert "\n" not in message  # one line: the entry points print one "config error:" line


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value)  # the parser's multi-line report, on one line


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_yaml_is_an_error_not_the_default_model(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty; .*'model', 'train'"):
        load_config(path)


@pytest.mark.parametrize("text", ["[1, 2]\n", "just a string\n", "3\n"])
def test_non_mapping_yaml_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(path)


def test_override_value_that_is_not_yaml_names_the_override() -> None:
    with pytest.raises(ConfigError, match=r"override 'model\.d_model=\[1': .*not valid YAML"):
        load_config(None, ["model.d_model=[1"])


@pytest.mark.parametrize(
    "uri",
    [
        "mlruns",
        "/tmp/store",
        "file:///tmp/store",
        "sqlite:///runs/x/mlflow.db",
        "postgresql+psycopg2://user@host/db",
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "databricks",
        "databricks://profile",
        "databricks-uc",
    ],
)
def test_tracking_uris_mlflow_opens_are_accepted(uri: str) -> None:
    assert load_config(None, [f"tracking.uri={uri}"]).tracking.uri == uri


@pytest.mark.parametrize("uri", ["foo://bar", "s3://bucket/mlruns", "ftp://host", "http+x://h"])
def test_unknown_tracking_uri_scheme_is_refused_at_validation(uri: str) -> None:
    scheme = uri.split(":")[0]
    with pytest.raises(ConfigError, match=rf"tracking\.uri='{re.escape(uri)}': unsupported scheme"
                       rf" '{re.escape(scheme)}'; allowed: .*'sqlite'"):  # fmt: skip
        load_config(None, [f"tracking.uri={uri}"])


def test_mapping_values_and_task_settings_are_type_checked() -> None:
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[0\]\.mixture\.chaining: expected"):
        load_config(None, ["curriculum.stages=[{mixture: {chaining: lots}}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.task_args\.hops: expected a list"):
        load_config(None, ["data.sources=[{task: chaining, task_args: {hops: 3}}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.task_args: chaining: vocab_size"):
        load_config(None, ["data.sources=[{task: chaining, task_args: {n_symbols: 999}}]"])
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]: a chaining problem takes up to"):
        load_config(None, ["train.seq_len=16", "data.sources=[{task: chaining}]"])
    load_config(None, ["data.sources=[{task: fact_lookup, task_args: {zipf: 1}}]"])  # int: float


def test_autotuning_backend_refused_in_deterministic_mode() -> None:
    with pytest.raises(ConfigError, match=r"kernels\.ssd=mamba_ssm autotunes .*'torch', 'triton'"):
        load_config(None, ["kernels.deterministic=true", "kernels.ssd=mamba_ssm"])


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
