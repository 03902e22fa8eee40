"""Model families (Hydra, Transformer, Mamba-2) behind one entry point: ``build_model``.

Imported lazily so that importing one component (``pretrain.models.common.ssm``) does not build
the import graph of every family.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CausalLM", "ModelConfig", "ModelOutput", "build_model"]


def __getattr__(name: str) -> Any:
    if name in ("CausalLM", "build_model"):
        from pretrain.models import lm

        return getattr(lm, name)
    if name == "ModelConfig":
        from pretrain.models.config import ModelConfig

        return ModelConfig
    if name == "ModelOutput":
        from pretrain.models.output import ModelOutput

        return ModelOutput
    raise AttributeError(f"module 'pretrain.models' has no attribute {name!r}")
