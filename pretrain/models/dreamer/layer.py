"""Dreamer's blocks: the shared recurrent layer, and the Transformer blocks of prelude and coda.

    shared layer, iteration r (input h_r, memory entries 0..r-1):
        memory += keys/values of h_r                          (entry r: this iteration's input)
        h = h_r + SeqAttn(n(h_r))                             path "attention" (causal)
        h = h + DepthAttn(n(h), memory 0..r)                  path "depth"
        h = h + ExpertAttn(n(h), r)                           path "moe"

Shape legend: B batch, T time, D d_model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.models.common.attention import CausalSelfAttention
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.sequence import SequenceContext, resolve_context
from pretrain.models.config import ModelConfig
from pretrain.models.dreamer.depth import DepthAttention, DepthState
from pretrain.models.dreamer.experts import ExpertAttention
from pretrain.models.transformer.block import build_transformer_block


class DreamerLayer(GatedPathBlock):
    """The layer looped over depth: sequence, depth and expert attention in turn (pre-norm,
    ungated residual sums). Its forward takes the iteration's ``DepthState`` and returns the
    state extended by its own input's keys and values, for the next iteration."""

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        context: SequenceContext | None = None,
        *,
        depth: DepthState,
        path_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, DepthState]:
        """x [B, T, D] -> (x' [B, T, D], aux_loss, the depth state with x remembered).

        ``path_kwargs``: further keyword arguments per path (a decode cache), as in
        ``GatedPathBlock.forward``.
        """
        context = resolve_context(x, seq_idx, context)
        depth_path = self.paths["depth"] if "depth" in self.paths else None
        if depth_path is not None and self.active["depth"]:
            depth = depth.extended(*depth_path.keys_values(x))
        kwargs = {name: dict(extra) for name, extra in (path_kwargs or {}).items()}
        for name, module in self.paths.items():
            if getattr(module, "uses_depth", False):
                kwargs.setdefault(name, {})["depth"] = depth
            elif getattr(module, "uses_depth_index", False):
                kwargs.setdefault(name, {})["depth_index"] = depth.index_tensor
        x, aux = super().forward(x, context=context, path_kwargs=kwargs)
        return x, aux, depth

    def begin_forward(self) -> None:
        """Called by the stack before iteration 0 of each forward."""
        for module in self.paths.values():
            begin = getattr(module, "begin_forward", None)
            if begin is not None:
                begin()

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the paths whose shapes are the same at every iteration (sequence
        and expert attention: r reaches them as a tensor), so each compiles once for the whole
        loop; depth attention, whose memory grows by one entry per iteration, stays eager."""
        for module in self.paths.values():
            if not getattr(module, "uses_depth", False):
                module.compile(*args, **kwargs)


def build_dreamer_layer(cfg: ModelConfig) -> DreamerLayer:
    """The shared layer of a Dreamer model."""
    dc = cfg.dreamer
    paths: dict[str, nn.Module] = {"attention": CausalSelfAttention(cfg.d_model, cfg.attention)}
    if dc.depth_attention:
        paths["depth"] = DepthAttention(cfg.d_model, dc.depth_heads, dc.recurrence, cfg.norm_eps)
    paths["moe"] = ExpertAttention(cfg.d_model, cfg.moe, dc.expert_key_dim, dc.max_recurrence)
    return DreamerLayer(cfg.d_model, paths, parallel=(), norm_eps=cfg.norm_eps, gated=False)


def build_outer_block(cfg: ModelConfig) -> GatedPathBlock:
    """A prelude or coda block: the Transformer baseline's block (attention + SwiGLU FFN)."""
    return build_transformer_block(cfg, 0)
