"""Exported models: ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``), and loading
them back. See docs/checkpoints.md, "Export".

::

    export/
      model.safetensors   the full, unsharded state dict in its own dtypes, written by safetensors'
                          ``save_model``: tensors that share memory (tied weights) are stored once,
                          each dropped name recorded in the file's metadata as {dropped: kept}
      config.json         {"format": "hydra-pretrain-export", "version": 1, "model": {...},
                          "active_paths": [...], "gate_ramp": {...}, "tokenizer": {...},
                          "source": {...}}
      tokenizer.json      the run's BPE tokenizer (only when config.json's tokenizer says "bpe")

``load_pretrained`` builds the ``CausalLM`` from ``config.json`` and loads the weights strictly
with safetensors' ``load_model`` (which ties shared names back itself). Exports written before
``save_model`` (an alias map under the metadata key ``tied_weights``) still read through
``load_safetensors_export``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from data_pipeline.tokenizer import ByteTokenizer, HFTokenizer, tokenizer_from_manifest
from kernels.backends import select_backends
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.files import TMP_PREFIX, atomic_write
from pretrain.config import config_to_dict, from_dict
from pretrain.config_errors import ConfigError
from pretrain.models import build_model
from pretrain.models.config import ModelConfig
from pretrain.models.kernel_backends import apply_kernel_backends
from pretrain.models.lm import CausalLM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
EXPORT_FORMAT, EXPORT_VERSION = "hydra-pretrain-export", 1
LEGACY_ALIASES_KEY = "tied_weights"  # exports before save_model: JSON {alias: stored name}
# config.json's "tokenizer" kind when the run trained on synthetic tasks only: token ids are the
# vocabulary (data_pipeline.tokens' special ids, then task symbols) and no text tokenizer exists
IDS_TOKENIZER = "ids"


class _FullState(nn.Module):
    """A gathered full state dict as a module: ``save_model`` dedupes ``state_dict()``."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.full = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return dict(self.full)


def write_export(
    model: nn.Module,
    config: dict[str, Any],
    out_dir: str | Path,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write ``model``'s state to ``out_dir/model.safetensors``, ``config`` to ``config.json`` and
    copy ``tokenizer_file`` to ``tokenizer.json``; each file is replaced atomically, and a
    ``tokenizer.json`` left by an earlier export is removed when none is given.

    Args:
        model: a plain (unsharded) module; tied parameters are stored once.
        config: plain JSON-able data.
        out_dir: created if needed.
        tokenizer_file: a Hugging Face ``tokenizer.json`` to ship with the model, or None.

    Returns:
        The safetensors path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS
    tmp = out_dir / f"{TMP_PREFIX}{WEIGHTS}.{os.getpid()}"
    save_model(model, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    atomic_write(out_dir / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    if tokenizer_file is not None:
        tmp = out_dir / f"{TMP_PREFIX}{TOKENIZER}.{os.getpid()}"
        shutil.copyfile(tokenizer_file, tmp)
        tmp.replace(out_dir / TOKENIZER)
    else:
        (out_dir / TOKENIZER).unlink(missing_ok=True)
    return path


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
    return write_export(_FullState(state), config_dict, out_dir)


def _metadata_aliases(metadata: dict[str, str], stored: set[str]) -> dict[str, str]:
    """{alias: stored name}: ``save_model``'s {dropped: kept} entries, or an older export's map."""
    if LEGACY_ALIASES_KEY in metadata:
        return json.loads(metadata[LEGACY_ALIASES_KEY])
    return {k: v for k, v in metadata.items() if k not in stored and v in stored}


def load_safetensors_export(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export back: (full state dict with tied names restored, config dict)."""
    out_dir = Path(out_dir)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(out_dir / WEIGHTS), framework="pt") as f:
        for name in f.keys():
            state[name] = f.get_tensor(name)
        aliases = _metadata_aliases(f.metadata() or {}, set(state))
    for alias, name in aliases.items():
        state[alias] = state[name]
    config = json.loads((out_dir / CONFIG).read_text())
    return state, config


def inference_settings(model: CausalLM) -> dict[str, Any]:
    """What the curriculum had switched at the exported step and the weights do not hold: the
    active paths and the gate ramps that are not 1 (a path being phased in)."""
    active = {name for block in model.blocks.values() for name, on in block.active.items() if on}
    ramps = {
        block_name: {name: r for name, r in block.ramp.items() if r != 1.0}
        for block_name, block in model.blocks.items()
    }
    return {
        "active_paths": sorted(active),
        "gate_ramp": {name: ramp for name, ramp in ramps.items() if ramp},
    }


def pretrained_config(
    model: CausalLM, tokenizer: dict[str, Any], source: dict[str, Any]
) -> dict[str, Any]:
    """The ``config.json`` of an export of ``model``.

    Args:
        model: the model as it runs at the exported step (paths and ramps set).
        tokenizer: ``describe()`` of the tokenizer (plus ``file`` when one is shipped), or
            ``{"kind": "ids", "vocab_size": V}`` for a run on synthetic tasks only.
        source: where the weights came from (checkpoint, step, engine, ...), for the record.
    """
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model": config_to_dict(model.cfg),
        **inference_settings(model),
        "tokenizer": tokenizer,
        "source": source,
    }


def _read_config(path: Path) -> dict[str, Any]:
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not an export: it needs {WEIGHTS} and {CONFIG}")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG} is unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / CONFIG} is not a JSON object")
    return config


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> CausalLM:
    """The model of an export directory, on ``device``, in eval mode, weights loaded strictly.

    ``config.json``'s ``model`` section builds it (an older export whose config is a run config
    or a bare model config works too); the active paths and gate ramps of the exported step are
    set again, and the fastest available kernels for ``device`` are picked, as for evaluation.

    Raises:
        CheckpointError: files missing or unreadable, a config this code cannot build, or
            weights that do not match the model (names the missing/unexpected keys).
    """
    path = Path(path)
    config = _read_config(path)
    device = torch.device(device)
    try:
        model_cfg = from_dict(ModelConfig, config.get("model", config), prefix="model")
        model = build_model(model_cfg, device=device)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG}: {err}") from None
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    except Exception as exc:  # safetensors raises RuntimeError, SafetensorError, OSError
        raise CheckpointError(f"{path / WEIGHTS} does not fit the model: {exc}") from None
    if "active_paths" in config:
        model.set_active_paths(config["active_paths"])
    for block_name, ramps in config.get("gate_ramp", {}).items():
        model.blocks[block_name].ramp.update(ramps)
    backends = select_backends({op: "auto" for op in ("ssd", "pkm", "moe", "attention")}, device)
    apply_kernel_backends(model, backends)
    return model.eval()


def exported_tokenizer(path: str | Path) -> ByteTokenizer | HFTokenizer | None:
    """The tokenizer shipped with an export; None when its vocabulary is raw token ids
    (``"kind": "ids"``: a run on synthetic tasks) or the export records none."""
    info = _read_config(Path(path)).get("tokenizer")
    if not info or info.get("kind") == IDS_TOKENIZER:
        return None
    return tokenizer_from_manifest(info, Path(path))
