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

from data_pipeline.config import SourceConfig
from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic import TASKS, build_task
from kernels.backends import AUTOTUNING
from parallel.dims import DIM_KEYS, PKM_SHARD_DIMS, ParallelDims, layout_problems
from pretrain.config_errors import ConfigError
from pretrain.curriculum import CurriculumConfig, StageConfig
from pretrain.data_config import DataConfig, source_reads
from pretrain.models.config import ModelConfig, model_config_problems, uses_ssm
from pretrain.models.registry import get_family, uses_component
from pretrain.train_config import (
    CheckpointConfig,
    ParallelConfig,
    RunSection,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "CurriculumConfig",
    "DataConfig",
    "ParallelConfig",
    "RunSection",
    "SourceConfig",
    "StageConfig",
    "TrackingConfig",
    "KernelsConfig",
    "RunConfig",
    "TrainConfig",
    "config_to_dict",
    "from_dict",
    "load_config",
    "parse_overrides",
    "validate_run_config",
]


KERNEL_BACKENDS = {
    "ssd": ("auto", "torch", "triton", "mamba_ssm"),
    "pkm": ("auto", "torch", "triton"),
    "moe": ("auto", "torch", "grouped_mm", "megablocks"),
    "attention": ("auto", "torch", "flex", "flash_attn"),
    "boundary_attention": ("auto", "torch", "flex"),
}


@dataclass
class KernelsConfig:
    """Backend of each op; ``auto`` picks the fastest available one for the device (logged)."""

    ssd: str = "auto"  # torch | triton | mamba_ssm | auto
    pkm: str = "auto"  # torch | triton | auto
    moe: str = "auto"  # torch | grouped_mm | megablocks | auto
    attention: str = "auto"  # torch | flex | flash_attn | auto
    boundary_attention: str = "auto"  # Attamba's attention: torch | flex | auto
    deterministic: bool = False  # fixed kernel configs, no autotuning

    def __post_init__(self) -> None:
        for op, choices in KERNEL_BACKENDS.items():
            if getattr(self, op) not in choices:
                raise ConfigError(f"kernels.{op}: must be one of {list(choices)}")
        for op, backend in sorted(AUTOTUNING):
            if self.deterministic and getattr(self, op) == backend:
                raise ConfigError(
                    f"kernels.{op}={backend} autotunes its kernels, which kernels.deterministic"
                    f"=true forbids; choose one of {[c for c in KERNEL_BACKENDS[op] if c != backend]}"
                )


@dataclass
class RunConfig:
    """Everything one run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSection = field(default_factory=RunSection)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)


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
        key_tp, item_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{key} key {k!r}"): _coerce(v, item_tp, f"{key}.{k}")
            for k, v in value.items()
        }
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
    except DataConfigError as err:  # the data pipeline's own checks: same error type for users
        raise ConfigError(f"{prefix}: {err}" if prefix else str(err)) from None


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
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({err})") from None
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
    source_names = {s.label for s in cfg.data.sources}
    for stage in cfg.curriculum.stages:
        key = f"curriculum.stages[{stage.name}]"
        if stage.seq_len and stage.seq_len > cfg.model.max_seq_len:
            problems.append(f"{key}.seq_len: exceeds model.max_seq_len={cfg.model.max_seq_len}")
        unknown = sorted(set(stage.mixture) - source_names)
        if unknown:
            problems.append(
                f"{key}.mixture: unknown sources {unknown}; known: {sorted(source_names)}"
            )
        if stage.mixture and sum(stage.mixture.values()) <= 0:
            problems.append(f"{key}.mixture: weights must not all be 0")
        problems += _stage_recurrence_problems(cfg.model, stage.recurrence, key)
    problems += synthetic_source_problems(cfg)
    if cfg.parallel.backend == "deepspeed" and cfg.train.compile:
        problems.append("train.compile: not supported with parallel.backend=deepspeed")
    host_sized = cfg.kernels.moe in ("torch", "megablocks")
    recomputed = cfg.train.compile and cfg.train.activation_checkpointing
    if host_sized and recomputed and moe_experts_per_layer(cfg) is not None:
        problems.append(
            f"kernels.moe={cfg.kernels.moe} with train.compile and"
            " train.activation_checkpointing: its group sizes come from the host, so a"
            " checkpoint recompute can run other graphs than its forward did; set"
            " kernels.moe=grouped_mm (or auto)"
        )
    problems += parallel_layout_problems(cfg, world_size=None)[0]
    return problems


def planned_reads(cfg: RunConfig) -> list[set[tuple[str, int]]]:
    """For each data source, the (split, seq_len) pairs this run will read it at."""
    tc = cfg.train
    stages = [(s.seq_len or tc.seq_len, s.mixture) for s in cfg.curriculum.stages]
    return source_reads(
        cfg.data, stages or [(tc.seq_len, {})], tc.seq_len if tc.eval_every else None
    )


def synthetic_source_problems(cfg: RunConfig) -> list[str]:
    """Synthetic sources with an unknown task, unknown or mistyped settings, settings the task
    refuses (for ``model.vocab_size``), or problems longer than a row they are read at."""
    problems = []
    reads = planned_reads(cfg)
    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        if src.task is None:
            continue
        if src.task not in TASKS:
            problems.append(f"{key}.task: unknown task {src.task!r}; known: {sorted(TASKS)}")
            continue
        try:
            task = build_task(src.task, cfg.model.vocab_size, **_typed_task_args(src, key))
        except ConfigError as err:
            problems.append(str(err))
            continue
        except (ValueError, ArithmeticError) as err:  # the task's own checks (DataConfigError)
            problems.append(f"{key}.task_args: {err} (model.vocab_size={cfg.model.vocab_size})")
            continue
        for _, seq_len in sorted(reads[i]):
            if task.max_len(seq_len) > seq_len:
                problems.append(
                    f"{key}: a {src.task} problem takes up to {task.max_len(seq_len)} tokens,"
                    f" more than the seq_len={seq_len} it is read at"
                )
    return problems


def _typed_task_args(src: SourceConfig, key: str) -> dict[str, Any]:
    """``src.task_args`` checked against its task's fields: an unknown or mistyped setting is an
    error naming its dotted key (the task's own checks then run on values of the right type)."""
    cls = TASKS[src.task]
    hints = typing.get_type_hints(cls)
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name != "vocab_size")
    typed = {}
    for name, value in src.task_args.items():
        dotted = f"{key}.task_args.{name}"
        if name not in allowed:
            raise ConfigError(
                f"unknown config key '{dotted}'; allowed keys of task {src.task}: {allowed}"
            )
        typed[name] = _coerce(value, hints[name], dotted)
    return typed


def moe_experts_per_layer(cfg: RunConfig) -> int | None:
    """Experts per MoE layer, or None when the model has no MoE layer."""
    model = cfg.model
    has_moe = model.moe.enabled and uses_component(model, "moe")
    return model.moe.n_experts if has_moe else None


def parallel_layout_problems(
    cfg: RunConfig, world_size: int | None
) -> tuple[list[str], dict[str, int]]:
    """Problems of ``cfg.parallel``'s layout (on ``world_size`` ranks, when known) and the sizes
    with ``-1`` filled in."""
    pc = cfg.parallel
    sizes = {k: getattr(pc, k) for k in DIM_KEYS}
    problems, sizes = layout_problems(sizes, world_size, pc.backend, moe_experts_per_layer(cfg))
    # the PKM split's size is only known for a possible layout
    known = sizes if not problems and world_size is not None else None
    problems += context_parallel_problems(cfg, sizes["cp"])
    problems += expert_parallel_problems(cfg, sizes["ep"])
    return problems + pkm_shard_problems(cfg, known), sizes


def _stage_recurrence_problems(model: ModelConfig, recurrence: int | None, key: str) -> list[str]:
    """A stage's ``recurrence`` needs a model that loops a block, and fits its depth embedding."""
    if recurrence is None:
        return []
    if not get_family(model.family).stack(model).looped_blocks():
        return [f"{key}.recurrence: model.family={model.family} loops no block over depth"]
    if recurrence > model.dreamer.max_recurrence:
        return [
            f"{key}.recurrence: {recurrence} exceeds model.dreamer.max_recurrence="
            f"{model.dreamer.max_recurrence}"
        ]
    return []


def expert_parallel_problems(cfg: RunConfig, ep: int) -> list[str]:
    """A family whose MoE layers cannot be split over expert-parallel ranks."""
    if ep > 1 and not get_family(cfg.model.family).supports_expert_parallel:
        return [
            f"parallel.ep={ep}: model.family={cfg.model.family} does not support expert"
            " parallelism; set parallel.ep=1"
        ]
    return []


def pkm_shard_problems(cfg: RunConfig, sizes: dict[str, int] | None) -> list[str]:
    """A PKM split the backend cannot run, or (given the layout's ``sizes``) value columns that
    do not split evenly over the ranks it names."""
    over = cfg.parallel.pkm_shard
    model = cfg.model
    has_pkm = model.pkm.enabled and uses_component(model, "pkm")
    if over == "none" or not has_pkm:
        return []
    if cfg.parallel.backend != "fsdp2":
        if over == "fsdp":
            return []  # the default: other backends have no FSDP ranks, the table stays whole
        return [
            f"parallel.pkm_shard={over} needs parallel.backend=fsdp2 (got"
            f" {cfg.parallel.backend}); set parallel.pkm_shard=none or fsdp"
        ]
    if sizes is None:
        return []
    dims = ParallelDims(**sizes)
    n = dims.size_of(PKM_SHARD_DIMS[over])
    d_value = model.pkm.d_value or model.d_model
    if d_value % n:
        return [
            f"parallel.pkm_shard={over} splits the PKM value columns over {n} ranks, which does"
            f" not divide model.pkm.d_value={d_value}"
        ]
    return []


def context_parallel_problems(cfg: RunConfig, cp: int) -> list[str]:
    """Sequence lengths that ``cp`` ranks cannot split: each must be a multiple of ``cp``, and
    a slice must hold the SSM conv's halo (``d_conv - 1`` tokens). Chunk sizes need not divide
    the slice. A family must support context parallelism at all."""
    if cp <= 1:
        return []
    problems = []
    if not get_family(cfg.model.family).supports_context_parallel:
        problems.append(
            f"parallel.cp={cp}: model.family={cfg.model.family} does not support context"
            " parallelism; set parallel.cp=1"
        )
    if cfg.train.compile:
        problems.append(
            f"train.compile=true with parallel.cp={cp}: compiling blocks that exchange states"
            " between context-parallel ranks is not supported yet; set train.compile=false"
        )
    lengths = {"train.seq_len": cfg.train.seq_len}
    for i, stage in enumerate(cfg.curriculum.stages):
        if stage.seq_len:
            lengths[f"curriculum.stages[{i}].seq_len"] = stage.seq_len
    for key, length in lengths.items():
        if length % cp:
            problems.append(
                f"{key}={length} is not a multiple of parallel.cp={cp}: each context-parallel"
                " rank takes an equal contiguous slice of every row"
            )
        elif uses_ssm(cfg.model) and length // cp < cfg.model.ssm.d_conv - 1:
            problems.append(
                f"{key}={length} / parallel.cp={cp} = {length // cp} tokens per rank is shorter"
                f" than the SSM conv halo (model.ssm.d_conv - 1 = {cfg.model.ssm.d_conv - 1})"
            )
    return problems


def resolve_parallel_dims(cfg: RunConfig, world_size: int) -> ParallelDims:
    """The validated layout of ``cfg`` on ``world_size`` ranks.

    Raises:
        ConfigError: naming every key of an impossible layout (before anything is built).
    """
    problems, sizes = parallel_layout_problems(cfg, world_size)
    if problems:
        raise ConfigError.from_problems(
            f"impossible parallel layout on {world_size} ranks", problems
        )
    return ParallelDims(**sizes)


def validate_run_config(cfg: RunConfig) -> None:
    """Raise one ConfigError listing every problem of ``cfg``."""
    problems = run_config_problems(cfg)
    if problems:
        raise ConfigError.from_problems("invalid config", problems)


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
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read: {err}") from None
        if data is None:  # an empty file would silently train the default model
            raise ConfigError(
                f"config file {path} is empty; it must hold a mapping of sections"
                f" {[f.name for f in dataclasses.fields(RunConfig)]}"
            )
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of sections at the top level, got"
                f" {type(data).__name__} {data!r:.60}"
            )
    data = _merge(data, parse_overrides(overrides or []))
    cfg = from_dict(RunConfig, data)
    validate_run_config(cfg)
    return cfg
