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
    from pretrain.models.stack import BlockStack

LAYERED_PARALLELIZE = "pretrain.models.parallelize:parallelize_layered"


@dataclass(frozen=True)
class ModelFamily:
    """One model family: how it builds its blocks, checks its config and is parallelized."""

    name: str
    """The ``model.family`` value that selects this family (its folder under pretrain/models)."""

    config_problems: Callable[[ModelConfig], list[str]]
    """The family's cross-field checks of a model config; every problem, each naming its key."""

    components: Callable[[ModelConfig], frozenset[str]]
    """The path kinds (names from ``PATH_NAMES``) a config of this family builds in some block;
    answers "has MoE / has PKM / uses SSM" without testing the family's name."""

    build_block: Callable[[ModelConfig, int], GatedPathBlock] | None = None
    """``build_block(cfg, layer)``: block ``layer`` of a layered stack (``n_layers`` blocks run
    once each); give this or ``build_stack``."""

    build_stack: Callable[[ModelConfig], BlockStack] | None = None
    """``build_stack(cfg)``: a stack of another shape (``pretrain.models.stack``), e.g. one block
    looped over depth."""

    parallelize: str = LAYERED_PARALLELIZE
    """"module:function" of the family's ``parallelize_*``, imported only when a run applies it
    (see ``resolve_parallelize``)."""

    supports_context_parallel: bool = True
    """Whether every component handles a context-parallel slice (``parallel.cp > 1``)."""

    supports_expert_parallel: bool = True
    """Whether the family's MoE layers can be split over expert-parallel ranks (``parallel.ep``)."""

    def __post_init__(self) -> None:
        if (self.build_block is None) == (self.build_stack is None):
            raise TypeError(f"family {self.name!r}: give exactly one of build_block, build_stack")

    def stack(self, cfg: ModelConfig) -> BlockStack:
        """The block stack of a model of ``cfg``."""
        if self.build_stack is not None:
            return self.build_stack(cfg)
        from pretrain.models.stack import LayeredStack

        build_block = self.build_block
        return LayeredStack(cfg.n_layers, lambda layer: build_block(cfg, layer))


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
