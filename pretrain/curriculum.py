"""The staged curriculum: a list of stages in the config, applied to the model step by step.

A stage says how long it lasts (steps or tokens), which block paths are on, its sequence length,
LR factor, data mixture, which parameters are frozen (fnmatch patterns on parameter names), over
how many steps the paths it switches on ramp in (their output is scaled 0 -> 1) and, for a model
that loops a block over depth (Dreamer), how many times it loops in training. The stage of any
step is a pure function of the config, so resuming mid-stage is exact.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from pretrain.config_errors import ConfigError
from pretrain.models.paths import PATH_NAMES


@dataclass
class StageConfig:
    """One curriculum stage."""

    name: str = "main"
    steps: int | None = None  # length in optimizer steps ...
    tokens: int | None = None  # ... or in tokens (whole steps, rounded up); the last stage: neither
    components: list[str] = field(default_factory=lambda: list(PATH_NAMES))  # paths switched on
    seq_len: int | None = None  # None: train.seq_len
    lr_factor: float = 1.0  # multiplies the scheduled LR
    mixture: dict[str, float] = field(
        default_factory=dict
    )  # source name -> weight (empty: as data)
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of frozen parameter names
    gate_ramp_steps: int = 0  # paths switched on by this stage ramp in over this many steps
    recurrence: int | None = None  # looped models: depth iterations in training (None: model's)

    def __post_init__(self) -> None:
        key = f"curriculum.stages[{self.name}]"
        unknown = sorted(set(self.components) - set(PATH_NAMES))
        if unknown:
            raise ConfigError(f"{key}.components: unknown {unknown}; allowed: {list(PATH_NAMES)}")
        if self.steps is not None and self.tokens is not None:
            raise ConfigError(f"{key}: give steps or tokens, not both")
        for name in ("steps", "tokens", "seq_len", "recurrence"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key}.{name}: must be >= 1")
        if self.lr_factor <= 0 or self.gate_ramp_steps < 0:
            raise ConfigError(f"{key}: lr_factor must be > 0 and gate_ramp_steps >= 0")


@dataclass
class CurriculumConfig:
    """Stages in order; empty means one stage with every component on for all of train.steps."""

    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class Stage:
    """A stage placed on the step axis: it covers steps [start, end)."""

    index: int
    cfg: StageConfig
    start: int
    end: int
    seq_len: int


def resolve_stages(
    cfg: CurriculumConfig, total_steps: int, seq_len: int, rows_per_step: int
) -> list[Stage]:
    """Place the stages on the step axis.

    Args:
        cfg: the curriculum section.
        total_steps: train.steps; the last stage (and only it) may run until there.
        seq_len: train.seq_len, the default sequence length.
        rows_per_step: sequences per optimizer step (global batch), to convert tokens.
    """
    stage_cfgs = cfg.stages or [StageConfig()]
    stages, start = [], 0
    for i, sc in enumerate(stage_cfgs):
        length_seq = sc.seq_len or seq_len
        if sc.steps is not None:
            length = sc.steps
        elif sc.tokens is not None:
            length = -(-sc.tokens // (rows_per_step * length_seq))
        elif i == len(stage_cfgs) - 1:
            length = total_steps - start
        else:
            raise ConfigError(f"curriculum.stages[{sc.name}]: needs steps or tokens (not last)")
        if length < 1 or start + length > total_steps:
            raise ConfigError(
                f"curriculum.stages[{sc.name}]: ends at step {start + length}, beyond train.steps="
                f"{total_steps} (or is empty); lengthen train.steps or shorten the stages"
            )
        stages.append(Stage(index=i, cfg=sc, start=start, end=start + length, seq_len=length_seq))
        start += length
    if start < total_steps:
        raise ConfigError(
            f"curriculum: stages cover {start} steps but train.steps={total_steps};"
            " leave the last stage without steps/tokens to run to the end"
        )
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that optimizer step ``step`` (0-based) belongs to."""
    for stage in stages:
        if stage.start <= step < stage.end:
            return stage
    return stages[-1]


def apply_stage(model: nn.Module, stages: list[Stage], step: int) -> Stage:
    """Switch paths, freezing, gate ramps and the stack's per-step settings (the recurrence) of
    ``model`` to what step ``step`` needs."""
    stage = stage_at(stages, step)
    model.set_active_paths(stage.cfg.components)
    model.set_step(step, stage.cfg.recurrence)
    previous = set(stages[stage.index - 1].cfg.components) if stage.index > 0 else set()
    ramp_steps = stage.cfg.gate_ramp_steps
    ramp = min(1.0, (step - stage.start + 1) / ramp_steps) if ramp_steps else 1.0
    for block in model.blocks.values():
        for name in block.active:
            block.ramp[name] = ramp if name not in previous and stage.index > 0 else 1.0
    for name, param in model.named_parameters():
        param.requires_grad_(not any(fnmatch.fnmatch(name, pat) for pat in stage.cfg.freeze))
    return stage
