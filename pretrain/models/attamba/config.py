"""The ``model.attamba`` section: how Attamba cuts sequences into chunks for its attention."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_errors import ConfigError

CHUNKING_MODES = ("fixed", "cyclic")


@dataclass
class AttambaConfig:
    """Chunk-boundary attention (Akhauri et al. 2024): keys and values come from SSM scans that
    restart at every chunk, so a chunk's last token carries its whole chunk; a query attends to
    those boundary tokens and to its ``leading_tokens`` most recent tokens."""

    chunk_size: int = 4  # P: tokens per chunk (the KV cache and attention shrink ~P-fold)
    leading_tokens: int = 16  # most recent tokens every query sees at full resolution (>= 1)
    chunking: str = "fixed"  # fixed: every layer cuts alike; cyclic: layer l shifts its chunks
    use_moe: bool = False  # the MoE (model.moe) replaces the FFN in blocks every moe.every

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError("model.attamba.chunk_size: must be >= 1")
        if self.leading_tokens < 1:
            raise ConfigError(
                "model.attamba.leading_tokens: must be >= 1 (a query must see at least itself)"
            )
        if self.chunking not in CHUNKING_MODES:
            raise ConfigError(f"model.attamba.chunking: must be one of {list(CHUNKING_MODES)}")

    def offset(self, layer: int, n_layers: int) -> int:
        """Where layer ``layer``'s chunk grid starts in each document (0 <= offset < P).

        Cyclic chunking spreads the offsets evenly over the depth, ``layer * P // n_layers``,
        so that tokens a layer leaves inside a chunk are boundaries of another layer. (The
        paper's ``layer * (P // n_layers)`` is 0 for every layer once n_layers > P.)
        """
        if self.chunking == "fixed":
            return 0
        return min(self.chunk_size - 1, layer * self.chunk_size // n_layers)
