"""The model-family registry: every registered family resolves, builds, checks and parallelizes."""

from __future__ import annotations

import dataclasses

import pytest

import pretrain.config as run_config
from pretrain.config import ConfigError, RunConfig, context_parallel_problems, load_config
from pretrain.models import build_model
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.config import ModelConfig, model_config_problems
from pretrain.models.family import ModelFamily, resolve_parallelize
from pretrain.models.paths import PATH_NAMES
from pretrain.models.registry import FAMILY_NAMES, get_family, uses_component
from pretrain.train_config import TrainConfig
from tests.pretrain.model_helpers import CONFIG_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(family: str) -> ModelConfig:
    cfg = ModelConfig(family=family, d_model=32, n_layers=2, d_ff=64, max_seq_len=64)
    if family == "dreamer":  # prelude + shared layer + coda; expert attention routes tokens
        cfg.n_layers = 3
        cfg.moe.routing, cfg.moe.score_func = "token", "sigmoid"
    return cfg


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_every_family_resolves_and_builds_its_stack(name: str) -> None:
    family = get_family(name)
    assert isinstance(family, ModelFamily) and family.name == name
    cfg = _small(name)
    assert family.config_problems(cfg) == []
    stack = family.stack(cfg)
    blocks = stack.build_blocks()
    assert set(stack.runs_per_forward()) == set(blocks)
    assert all(isinstance(block, GatedPathBlock) for block in blocks.values())
    built = {path for block in blocks.values() for path in block.paths}
    assert built <= family.components(cfg) <= set(PATH_NAMES)


def test_a_family_declares_one_way_to_build_its_stack() -> None:
    with pytest.raises(TypeError, match="exactly one of build_block, build_stack"):
        dataclasses.replace(get_family("dreamer"), build_block=lambda cfg, layer: None)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_parallelize_resolves_to_a_callable(name: str) -> None:
    assert callable(resolve_parallelize(get_family(name)))


def test_a_bad_parallelize_reference_is_refused() -> None:
    family = dataclasses.replace(get_family("hydra"), parallelize="pretrain.models.parallelize")
    with pytest.raises(ValueError, match="module:function"):
        resolve_parallelize(family)


def test_unknown_family_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.family"):
        get_family("no_such_family")
    with pytest.raises(ConfigError, match=r"model\.family"):
        load_config(None, ["model.family=no_such_family"])


SHIPPED = [
    "hydra-tiny.yaml",
    "hydra-29m.yaml",
    "hydra-1.6b.yaml",
    "hydra-1.6b-64k.yaml",
    "hydra-1.6b-pkm1m.yaml",
    "transformer-29m.yaml",
    "transformer-29m-flops.yaml",
    "transformer-29m-mem.yaml",
    "mamba2-29m.yaml",
    "attamba-tiny.yaml",
    "dreamer-tiny.yaml",
    "dreamer-29m.yaml",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_components_are_the_built_paths(name: str) -> None:
    cfg = load_config(CONFIG_DIR / name)
    model = build_model(cfg.model, device="meta")
    built = {name for block in model.blocks.values() for name in block.paths}
    assert built == get_family(cfg.model.family).components(cfg.model)


def test_components_answer_the_run_checks() -> None:
    hydra = _small("hydra")
    assert uses_component(hydra, "moe") and uses_component(hydra, "ssm")
    assert not uses_component(_small("transformer"), "moe")  # its MoE section is unused
    assert not uses_component(_small("mamba2"), "attention")
    assert run_config.moe_experts_per_layer(RunConfig(model=_small("transformer"))) is None
    assert run_config.moe_experts_per_layer(RunConfig(model=hydra)) == hydra.moe.n_experts


def test_family_checks_keep_their_messages() -> None:
    bad_heads = dataclasses.replace(_small("transformer"), d_ff=0)
    bad_heads.moe.enabled = False
    bad_heads.attention.n_heads = 3
    problems = model_config_problems(bad_heads)
    assert problems == [
        "model.attention.n_heads: 3 does not divide model.d_model=32",
        "model.d_ff: a Transformer needs d_ff > 0",
    ]
    mamba = _small("mamba2")
    mamba.ssm.head_dim = 48
    assert model_config_problems(mamba)[0].startswith("model.ssm.head_dim: 48 does not divide")


def test_a_family_without_context_parallelism_gets_the_cp_problem(monkeypatch) -> None:
    no_cp = dataclasses.replace(get_family("hydra"), supports_context_parallel=False)
    monkeypatch.setattr(run_config, "get_family", lambda name: no_cp)
    cfg = RunConfig(model=_small("hydra"), train=TrainConfig(seq_len=64))
    problems = context_parallel_problems(cfg, 2)
    assert any("parallel.cp=2" in p and "model.family=hydra" in p for p in problems)
    assert context_parallel_problems(cfg, 1) == []
    monkeypatch.undo()
    assert not any("model.family" in p for p in context_parallel_problems(cfg, 2))
