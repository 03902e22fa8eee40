"""Fault-tolerant checkpoints (DCP, temp-dir + rename, ``latest`` last, verified at load) and
export of a trained model to one safetensors file. See docs/checkpoints.md."""

from pretrain.checkpoint.errors import CheckpointError, CheckpointWarning
from pretrain.checkpoint.export import (
    export_safetensors,
    exported_tokenizer,
    load_pretrained,
    load_safetensors_export,
)
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.model_state import ModelOptimizerState
from pretrain.checkpoint.state import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointWarning",
    "ModelOptimizerState",
    "capture_rng_state",
    "export_safetensors",
    "exported_tokenizer",
    "load_pretrained",
    "load_safetensors_export",
    "restore_rng_state",
]
