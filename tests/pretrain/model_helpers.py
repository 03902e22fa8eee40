"""Shared helpers for model-level tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.models import CausalLM, build_model

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Configs small enough to run forward/backward on a 2-core CPU inside the test suite.
CPU_CONFIGS = [
    "hydra-tiny.yaml",
    "hydra-29m.yaml",
    "transformer-29m.yaml",
    "mamba2-29m.yaml",
    "attamba-tiny.yaml",
    "attamba-29m.yaml",
    "dreamer-tiny.yaml",
    "dreamer-29m.yaml",
]
# One small config per family: the family-generic tests (packing, gradients, bf16) run on these.
FAMILY_CONFIGS = [
    "hydra-tiny.yaml",
    "transformer-29m.yaml",
    "mamba2-29m.yaml",
    "attamba-tiny.yaml",
    "dreamer-tiny.yaml",
]
# Overrides that shrink a family config where a test only needs its structure, not its size.
SHRINK = {"transformer-29m.yaml": ("model.n_layers=2",), "mamba2-29m.yaml": ("model.n_layers=2",)}


def build_from_config(name: str, *overrides: str, seed: int = 0) -> CausalLM:
    cfg = load_config(CONFIG_DIR / name, list(overrides))
    torch.manual_seed(seed)
    return build_model(cfg.model)


def random_tokens(model: CausalLM, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen)
