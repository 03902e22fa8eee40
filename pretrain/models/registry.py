"""The registry of model families: one name per family, its ``ModelFamily`` found by import.

Adding a family: a folder ``pretrain/models/<name>/`` whose ``family.py`` declares
``FAMILY = ModelFamily(name="<name>", ...)``, and its name in ``FAMILY_NAMES`` below. The
folder's ``__init__.py`` stays empty, so that the model config can import a family's own config
section (``pretrain.models.attamba.config``) without importing its blocks.

Family modules are imported lazily (by ``get_family``), never when this module is imported:
``pretrain.models.config`` imports ``FAMILY_NAMES`` from here, and every family imports the
config, so an eager import would be a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pretrain.config_errors import ConfigError
from pretrain.models.family import ModelFamily

if TYPE_CHECKING:
    from pretrain.models.config import ModelConfig

FAMILY_NAMES = ("hydra", "transformer", "mamba2", "attamba", "dreamer")


def get_family(name: str) -> ModelFamily:
    """The ``ModelFamily`` declared as ``FAMILY`` by ``pretrain.models.<name>.family``.

    Raises:
        ConfigError: ``name`` is not a registered family (the message names ``model.family``).
    """
    if name not in FAMILY_NAMES:
        raise ConfigError(f"model.family: unknown family {name!r}; known: {list(FAMILY_NAMES)}")
    module = importlib.import_module(f"pretrain.models.{name}.family")
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, ModelFamily) or family.name != name:
        raise TypeError(
            f"pretrain.models.{name}.family must declare FAMILY = ModelFamily(name={name!r})"
        )
    return family


def uses_component(cfg: ModelConfig, component: str) -> bool:
    """Whether a model of ``cfg`` has a path of kind ``component`` ("moe", "pkm", "ssm", ...)."""
    return component in get_family(cfg.family).components(cfg)
