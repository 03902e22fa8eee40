"""Models, configs, the training loop, curriculum, optimizer, checkpoints and evaluation.

``from pretrain import load_pretrained`` loads an exported model (``hydra-pretrain export``);
it is imported on first use, so ``import pretrain.config`` stays light.
"""

from typing import Any

__all__ = ["load_pretrained"]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from pretrain.checkpoint.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
