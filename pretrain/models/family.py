"""``ModelFamily``: everything the rest of the system needs to know about one model family.

Each ``pretrain/models/<family>/__init__.py`` declares one ``FAMILY = ModelFamily(...)``; the
registry (``pretrain.models.registry``) finds it by name. Code outside the family asks the
family (``get_family(cfg.family).components(cfg)``) instead of testing ``family == "..."``.

This module imports nothing heavy: the config module reaches it through the registry, and the
parallelize function is a "module:function" string so that no model file imports
``torch.distributed``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.models.common.block import GatedPathBlock
    from pretrain.models.config import ModelConfig

LAYERED_PARALLELIZE = "pretrain.models.parallelize:parallelize_layered"


@dataclass(frozen=True)
class ModelFamily:
    """One model family: how it builds its blocks, checks its config and is parallelized."""

    name: str
    """The ``model.family`` value that selects this family (its folder under pretrain/models)."""

    build_block: Callable[[ModelConfig, int], GatedPathBlock]
    """``build_block(cfg, layer)``: block ``layer`` of the layered stack (``CausalLM``)."""

    config_problems: Callable[[ModelConfig], list[str]]
    """The family's cross-field checks of a model config; every problem, each naming its key."""

    components: Callable[[ModelConfig], frozenset[str]]
    """The path kinds (names from ``PATH_NAMES``) a config of this family builds in some block;
    answers "has MoE / has PKM / uses SSM" without testing the family's name."""

    parallelize: str = LAYERED_PARALLELIZE
    """"module:function" of the family's ``parallelize_*``, imported only when a run applies it
    (see ``resolve_parallelize``)."""

    supports_context_parallel: bool = True
    """Whether every component handles a context-parallel slice (``parallel.cp > 1``)."""


def resolve_parallelize(family: ModelFamily) -> Callable[..., Any]:
    """The family's ``parallelize_*`` function, imported from its "module:function" reference.

    Raises:
        ValueError: the reference is not "module:function" or names nothing callable.
    """
    module_name, sep, attr = family.parallelize.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"family {family.name!r}: parallelize={family.parallelize!r} is not 'module:function'"
        )
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"family {family.name!r}: {family.parallelize!r} is not a callable")
    return fn
