"""The ``model.dreamer`` section: the recurrent stack and its depth and expert attention."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config_errors import ConfigError


@dataclass
class DreamerConfig:
    """Depth-recurrent attention mixtures (Knupp et al. 2026): ``n_prelude`` blocks, one shared
    layer run ``recurrence`` times, ``n_coda`` blocks. The shared layer mixes sequence attention
    (``model.attention``), depth attention over its own earlier iterations and expert attention
    (``model.moe``: sigmoid scores over learned expert keys, token routing)."""

    n_prelude: int = 1  # non-recurrent Transformer blocks after the embedding
    n_coda: int = 1  # non-recurrent Transformer blocks before the head
    recurrence: int = 4  # R: iterations of the shared layer at evaluation (and in training,
    # unless train_recurrence or a curriculum stage's recurrence says otherwise)
    train_recurrence: list[int] = field(default_factory=list)  # [lo, hi]: R drawn per step
    max_recurrence: int = 8  # iterations the depth embedding is sized for (>= every R used)
    depth_attention: bool = True  # the depth attention path of the shared layer
    depth_heads: int = 4  # heads of the depth attention (head dim d_model / depth_heads)
    expert_key_dim: int = 64  # size of the expert keys and of the router query

    def __post_init__(self) -> None:
        for name in ("n_prelude", "n_coda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.dreamer.{name}: must be >= 0")
        for name in ("recurrence", "max_recurrence", "depth_heads", "expert_key_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.dreamer.{name}: must be >= 1")
        if self.train_recurrence:
            lo_hi = self.train_recurrence
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ConfigError(
                    "model.dreamer.train_recurrence: must be [lo, hi] with 1 <= lo <= hi"
                    f" (got {lo_hi})"
                )
        largest = max([self.recurrence, *self.train_recurrence])
        if largest > self.max_recurrence:
            raise ConfigError(
                f"model.dreamer.max_recurrence: {self.max_recurrence} is below the recurrence"
                f" {largest} the config asks for"
            )
