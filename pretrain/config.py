"""Run configuration: YAML file + dotted command-line overrides -> typed, validated dataclasses.

``load_config(path, overrides)`` is the only entry point most code needs. Unknown keys are errors
that name the dotted key and list the allowed ones; values are type-checked against the dataclass
field types; cross-section checks run once, collecting every problem, before anything is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.config_errors import ConfigError
from pretrain.models.config import ModelConfig, model_config_problems

__all__ = [
    "ConfigError",
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "config_to_dict",
    "from_dict",
    "load_config",
    "parse_overrides",
    "validate_run_config",
]


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    pkm_value_lr: float | None = None  # LR of PKM value tables (None: same as lr); never decayed
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr: must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio: must be in [0, 1]")
        if self.pkm_value_lr is not None and self.pkm_value_lr <= 0:
            raise ConfigError("train.pkm_value_lr: must be > 0 (or null for train.lr)")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("train.betas: must be two numbers in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError("train.device: must be one of ['auto', 'cpu', 'cuda']")


@dataclass
class DataConfig:
    """Where training tokens come from."""

    task: str = "chaining"  # built-in synthetic task
    chain_hops: list[int] = field(default_factory=lambda: [2, 3])  # proof lengths (chaining)
    n_symbols: int = 64  # distinct entity symbols (chaining)

    def __post_init__(self) -> None:
        if self.task != "chaining":
            raise ConfigError("data.task: must be one of ['chaining']")
        if not self.chain_hops or min(self.chain_hops) < 1:
            raise ConfigError("data.chain_hops: needs at least one proof length >= 1")
        if self.n_symbols < 4:
            raise ConfigError("data.n_symbols: must be >= 4")


@dataclass
class RunConfig:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------- dict -> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys by dotted name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'; allowed keys here: {sorted(fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Component checks name their key relative to the component; keep them as they are.
        raise ConfigError(str(err)) from None


def config_to_dict(cfg: Any) -> dict:
    """The plain nested dict of a config (for logging, checkpoints and YAML dumps)."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------- overrides


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["model.d_model=256", "train.steps=10"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------ validation


def run_config_problems(cfg: RunConfig) -> list[str]:
    """Every cross-section problem of a run config, each naming its key."""
    problems = model_config_problems(cfg.model)
    if cfg.train.seq_len > cfg.model.max_seq_len:
        problems.append(
            f"train.seq_len: {cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    return problems


def validate_run_config(cfg: RunConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``."""
    problems = run_config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply dotted overrides, type-check and validate it.

    Args:
        path: YAML file; ``None`` starts from the defaults.
        overrides: ``section.key=value`` strings, applied after the file.

    Returns:
        A validated ``RunConfig``.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data)
    validate_run_config(cfg)
    return cfg
