"""Parameter accounts of the shipped configs (built on the meta device: no memory)."""

from __future__ import annotations

from pretrain.config import load_config
from pretrain.models import build_model
from pretrain.models.params import count_parameters
from tests.pretrain.model_helpers import CONFIG_DIR


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
