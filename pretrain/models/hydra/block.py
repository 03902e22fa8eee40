"""The Hydra block: parallel gated paths, then optional memories.

    h = x + g_ssm * SSM(n(x)) + g_att * SGA(n(x)) + g_ffn * FFN_or_MoE(n(x))   (path "ffn" or "moe")
    h = h + g_ws * Workspace(n(h))      (blocks listed in workspace.after_blocks)
    h = h + g_pkm * PKM(n(h))           (blocks listed in pkm.after_blocks)

Each path has its own RMSNorm and a learnable scalar gate. A path that is switched off (absent
from the config, or deactivated at run time by the curriculum) is skipped: it costs nothing.

Shape legend: B batch, T time, D d_model.
"""

from __future__ import annotations

from torch import nn

from pretrain.models.common.attention import SparseGlobalAttention
from pretrain.models.common.block import GatedPathBlock
from pretrain.models.common.layers import SwiGLU
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.common.pkm import ProductKeyMemory
from pretrain.models.common.ssm import Mamba2Mixer
from pretrain.models.common.workspace import WorkspaceMemory
from pretrain.models.config import ModelConfig

PARALLEL_PATHS = ("ssm", "attention", "ffn", "moe")
MEMORY_PATHS = ("workspace", "pkm")


def hydra_block_paths(cfg: ModelConfig, layer: int) -> dict[str, nn.Module]:
    """The path modules that block ``layer`` of a Hydra model holds, keyed by path name."""
    d, paths = cfg.d_model, {}
    if cfg.ssm.enabled:
        paths["ssm"] = Mamba2Mixer(d, cfg.ssm, norm_eps=cfg.norm_eps)
    if cfg.attention.enabled and (layer + 1) % cfg.attention.every == 0:
        paths["attention"] = SparseGlobalAttention(d, cfg.attention)
    if cfg.moe.enabled and (layer + 1) % cfg.moe.every == 0:
        paths["moe"] = ChunkMoE(d, cfg.moe)  # takes the FFN's place in this block
    elif cfg.d_ff > 0:
        paths["ffn"] = SwiGLU(d, cfg.d_ff)
    if cfg.workspace.enabled and layer in cfg.workspace.after_blocks:
        paths["workspace"] = WorkspaceMemory(d, cfg.workspace, norm_eps=cfg.norm_eps)
    if cfg.pkm.enabled and layer in cfg.pkm.after_blocks:
        paths["pkm"] = ProductKeyMemory(d, cfg.pkm, norm_eps=cfg.norm_eps)
    return paths


def build_hydra_block(cfg: ModelConfig, layer: int) -> GatedPathBlock:
    """Block ``layer`` of a Hydra model."""
    paths = hydra_block_paths(cfg, layer)
    return GatedPathBlock(cfg.d_model, paths, parallel=PARALLEL_PATHS, norm_eps=cfg.norm_eps)
