"""Inference cache account: the bytes one sequence keeps for incremental decoding, per component.

Each path module reports its own state (``cache_bytes(context_len, bytes_per_elem)``): attention
its keys/values, the SSM its fixed-size scan and conv state, the workspace its slots; a module
without the method (FFN, MoE, PKM: per-token maps) keeps nothing. Works on the meta device.
"""

from __future__ import annotations

from torch import nn

from pretrain.models.lm import CausalLM


def path_cache_bytes(module: nn.Module, context_len: int, bytes_per_elem: int = 2) -> int:
    """Decode-state bytes of one block path at ``context_len`` tokens (0 if it reports none)."""
    own = getattr(module, "cache_bytes", None)
    return own(context_len, bytes_per_elem) if own is not None else 0


def inference_cache_bytes(
    model: CausalLM, context_len: int, bytes_per_elem: int = 2
) -> dict[str, int]:
    """Bytes of one sequence's decode cache after ``context_len`` tokens.

    Args:
        model: the model (every built path counts, whatever the curriculum switched off).
        context_len: tokens already in the context.
        bytes_per_elem: size of a cached activation element (2: bf16); fp32 states stay 4.

    Returns:
        Path name -> bytes summed over block runs (every path kind of the model, 0 for stateless
        ones), plus "total".
    """
    out: dict[str, int] = {}
    runs = model.stack.runs_per_forward(training=False)
    for block_name, block in model.blocks.items():
        for name, module in block.paths.items():
            # a looped block keeps one state per run (each depth has its own keys and values)
            state = path_cache_bytes(module, context_len, bytes_per_elem)
            out[name] = out.get(name, 0) + round(runs[block_name] * state)
    out["total"] = sum(out.values())
    return out
