"""Model-side metrics logged with each step: expert load, PKM key usage, path gates, memory."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from pretrain.models.common.moe import ChunkMoE
from pretrain.models.common.pkm import ProductKeyMemory


def moe_layers(model: nn.Module) -> dict[str, ChunkMoE]:
    """MoE modules by their block index (``"3"`` for block 3)."""
    return {name.split(".")[1]: m for name, m in model.named_modules() if isinstance(m, ChunkMoE)}


def pkm_layers(model: nn.Module) -> list[ProductKeyMemory]:
    """Every product-key memory of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, ProductKeyMemory)]


def component_metrics(model: nn.Module) -> dict[str, float]:
    """Per-expert load (fraction of tokens, per MoE layer, over every routing rank; per depth for
    a looped layer), the diversity of the chosen expert sets, tokens per
    EP rank, PKM usage (over the logging window and every rank) and lookup time (forward and
    backward of the last step; ``step_shares`` turns it into a share of the step), gate values,
    and a looped stack's training recurrence.

    Call after the components' after-optimizer-step hooks (which sum the MoE load over ranks).
    """
    out: dict[str, float] = {}
    for layer, moe in moe_layers(model).items():
        load = moe.expert_load()
        if load.sum() > 0:
            for e, frac in enumerate(load.tolist()):
                out[f"moe/L{layer}/expert{e}"] = frac
            out[f"moe/L{layer}/max_over_mean"] = float(load.max() / load.mean())
            out.update(_tokens_per_ep_rank(layer, moe))
        out.update({f"moe/L{layer}/{k}": v for k, v in moe.selection_metrics().items()})
    for name, m in model.named_modules():
        if isinstance(m, ProductKeyMemory):
            layer = name.split(".")[1]
            out[f"pkm/L{layer}/key_usage"] = float(m.key_usage())
            out[f"pkm/L{layer}/lookup_time_s"] = m.lookup_timer.last_step_s()
            m.reset_usage()
    stack = getattr(model, "stack", None)
    looped = stack.looped_blocks() if stack is not None else frozenset()
    if looped:  # the depth this step trained at
        runs = stack.runs_per_forward(training=True)
        out["recurrence"] = max(runs[name] for name in looped)
    for bname, block in model.blocks.items():
        for path, gate in block.gates.items():
            value = gate.full_tensor() if hasattr(gate, "full_tensor") else gate
            out[f"gate/L{bname}/{path}"] = float(value.detach().float())
    return out


def step_shares(metrics: dict[str, float], step_time_s: float) -> dict[str, float]:
    """``<name>_share`` = ``<name>_time_s / step_time_s`` for each component timing."""
    return {
        key.removesuffix("_time_s") + "_share": value / step_time_s
        for key, value in metrics.items()
        if key.endswith("_time_s") and step_time_s > 0
    }


def _tokens_per_ep_rank(layer: str, moe: ChunkMoE) -> dict[str, float]:
    """(token, slot) rows each EP rank computed in the last step, averaged over EP groups."""
    ep = getattr(moe.dispatcher, "ep_size", 1)
    if ep == 1 or moe.reducer is None:
        return {}
    groups = moe.reducer.n_ranks // ep  # EP groups among the data-parallel ranks
    per_rank = moe.step_load.view(ep, -1).sum(1) / groups
    return {f"moe/L{layer}/tokens_ep_rank{r}": float(n) for r, n in enumerate(per_rank)}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory: CUDA allocator on GPU, the process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
