"""Typed sections of a run config that belong to training: loop, checkpoints, parallelism, tracking."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from parallel.dims import PKM_SHARD_DIMS
from pretrain.config_errors import ConfigError

SCHEDULES = ("cosine", "wsd")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_BACKENDS = ("none", "ddp", "fsdp2", "deepspeed")
# The stores MLflow's tracking-store registry opens (besides a plain local path): a file store,
# a tracking server, Databricks / Unity Catalog, and SQLAlchemy databases. Anything else would
# only fail later, in the background, while training runs untracked.
TRACKING_SCHEMES = ("file", "http", "https", "databricks", "databricks-uc", "uc")
TRACKING_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # each may add "+driver"
_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def tracking_uri_problem(uri: str, key: str) -> str | None:
    """Why MLflow cannot open the tracking store ``uri`` (named ``key`` in the message), or None.

    A string without a scheme (or with a one-letter Windows drive) is a local path.
    """
    match = _URI_SCHEME.match(uri)
    if match is None or len(match.group(1)) == 1:
        return None
    scheme = match.group(1).lower()
    if scheme in TRACKING_SCHEMES or scheme.split("+")[0] in TRACKING_DB_SCHEMES:
        return None
    return (
        f"{key}={uri!r}: unsupported scheme '{scheme}'; allowed: a local path or a URI with"
        f" scheme {list(TRACKING_SCHEMES + TRACKING_DB_SCHEMES)} (databases may add +driver,"
        " e.g. postgresql+psycopg2://)"
    )


@dataclass
class TrainConfig:
    """Optimisation and loop settings."""

    steps: int = 100  # total optimizer steps (the last curriculum stage runs until here)
    batch_size: int = 8  # sequences per micro-batch, per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence (a curriculum stage may override it)
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm (0 disables clipping)
    pkm_value_lr: float | None = None  # LR of PKM value tables (None: same as lr); never decayed
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations on held-out data (0: never)
    eval_batches: int = 4  # batches per evaluation
    device: str = "auto"  # auto | cpu | cuda
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    max_nonfinite: int = 3  # consecutive non-finite losses before rolling back to a checkpoint
    peak_tflops: float | None = None  # device peak for MFU (None: known GPUs by name, else no MFU)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches"):
            _require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(self.schedule in SCHEDULES, "train.schedule", f"must be one of {list(SCHEDULES)}")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _require(0 <= self.wsd_decay_fraction <= 1, "train.wsd_decay_fraction", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(
            self.pkm_value_lr is None or self.pkm_value_lr > 0,
            "train.pkm_value_lr",
            "must be > 0 (or null for train.lr)",
        )
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
        )
        _require(self.device in DEVICES, "train.device", f"must be one of {list(DEVICES)}")
        _require(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written (always also at stage changes, SIGTERM and the end)."""

    every: int = 0  # steps between checkpoints (0: only at stage changes, signals and the end)
    keep_last: int = 3  # keep this many most recent checkpoints
    keep_every: int | None = None  # also keep every checkpoint whose step is a multiple of this
    async_save: bool = False  # stage tensors to CPU and write in the background
    resume: bool = True  # continue from the latest valid checkpoint in the run directory
    enabled: bool = True  # false: write and read no checkpoint at all (throw-away runs)

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", "must be >= 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _require(
            self.keep_every is None or self.keep_every >= 1, "checkpoint.keep_every", "must be >= 1"
        )


@dataclass
class ParallelConfig:
    """Data-parallel backend (FSDP2 or DeepSpeed ZeRO) and the layout of the device mesh.

    dp_replicate x dp_shard x cp must equal the world size (-1 on one of them: fill it in);
    ep ranks are carved out of dp_shard (see ``parallel.dims``). Explained in docs/parallelism.md.
    """

    backend: str = "none"  # none | ddp | fsdp2 | deepspeed
    dp_replicate: int = 1  # HSDP replicas (fsdp2): each holds one FSDP-sharded copy
    dp_shard: int = -1  # FSDP ranks sharding the dense parameters (-1: the rest of the world)
    cp: int = 1  # context-parallel ranks per sequence
    ep: int = 1  # expert-parallel ranks (fsdp2), a divisor of dp_shard and model.moe.n_experts
    # PKM value tables split by columns over these ranks, outside FSDP (fsdp2 only): fsdp (the
    # dense parameters' FSDP ranks) | dp_shard | efsdp | ep | cp | none (sharded with its block)
    pkm_shard: str = "fsdp"
    deepspeed_config: str = "configs/deepspeed/zero2.json"  # ZeRO stage and options
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3 style)
    mixed_precision: bool = True  # bf16 params/compute with fp32 reduce, on CUDA only
    # a collective (or the start of the process group) that waits longer fails, naming the
    # rank, the phase and the ranks elsewhere (None: 60 s on CPU, 600 s on GPU)
    timeout_s: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.backend in PARALLEL_BACKENDS,
            "parallel.backend",
            f"must be one of {list(PARALLEL_BACKENDS)}",
        )
        _require(
            self.timeout_s is None or self.timeout_s >= 1,
            "parallel.timeout_s",
            "must be >= 1 (seconds) or null (60 on CPU, 600 on GPU)",
        )
        _require(
            self.pkm_shard in PKM_SHARD_DIMS,
            "parallel.pkm_shard",
            f"must be one of {list(PKM_SHARD_DIMS)}",
        )


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only; never blocks training)."""

    enabled: bool = True
    experiment: str = "hydra-pretrain"
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the run directory
    system_metrics: bool = True
    # at the first checkpoint, how long to wait for the new MLflow run to exist so that the
    # checkpoint can name it (a resume then continues that run); the wait ends when it exists
    run_id_wait_s: float = 10.0

    def __post_init__(self) -> None:
        problem = tracking_uri_problem(self.uri, "tracking.uri") if self.uri else None
        if problem:
            raise ConfigError(problem)
        _require(self.run_id_wait_s >= 0, "tracking.run_id_wait_s", "must be >= 0")


@dataclass
class RunSection:
    """Where a run lives."""

    dir: str = "runs/default"  # checkpoints, MLflow store, config and plots
    name: str | None = None  # MLflow run name (None: the directory name)
    plot: bool = True  # write plots/training.png at the end (and log it to MLflow)
