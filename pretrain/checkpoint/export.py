"""Export a trained model as one ``model.safetensors`` plus ``config.json``, for sharing.

safetensors refuses tensors that share storage (tied input/output embeddings), so names that are
the same tensor are written once and recorded as aliases in the file's metadata;
``load_safetensors_export`` puts them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pretrain.checkpoint.files import atomic_write

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ALIASES_KEY = "tied_weights"  # safetensors metadata: JSON {alias name: stored name}


def _dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once: identical views become aliases, other overlaps get copies."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        # a different view into storage already stored (or a strided view) must stand alone
        shared = ptr in storages and tensor.numel() > 0
        stored[name] = (
            tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
        )
        storages.add(ptr)
    return stored, aliases


def export_safetensors(model: nn.Module, config_dict: dict[str, Any], out_dir: Path) -> Path | None:
    """Write the full, unsharded ``model`` state to ``out_dir/model.safetensors`` + ``config.json``.

    Collective for an FSDP2-sharded model (every rank must call it: the full state dict is
    gathered); rank 0 writes. Tensors keep their dtype; names are FQNs without wrapper prefixes.

    Args:
        model: the unwrapped model (plain or FSDP2-sharded).
        config_dict: the model/run config as plain JSON-able data.
        out_dir: created if needed; existing files are replaced atomically.

    Returns:
        The safetensors path on rank 0, None on other ranks.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    tensors, aliases = _dedup_shared({k: v.detach().cpu() for k, v in state.items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS
    tmp = out_dir / f".tmp-{WEIGHTS}"
    save_file(tensors, str(tmp), metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)})
    tmp.replace(path)
    atomic_write(out_dir / CONFIG, json.dumps(config_dict, indent=2).encode())
    return path


def load_safetensors_export(out_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export back: (full state dict with tied names restored, config dict)."""
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(out_dir / WEIGHTS), framework="pt") as f:
        for name in f.keys():
            state[name] = f.get_tensor(name)
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    for alias, name in aliases.items():
        state[alias] = state[name]
    config = json.loads((out_dir / CONFIG).read_text())
    return state, config
