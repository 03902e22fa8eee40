"""Checks of a validated run config against this machine, before anything is written or started.

``validate_run_config`` decides what the config alone can; ``preflight`` checks what depends on
where the run starts: the launcher's world size (layout, curriculum), the device (CUDA present,
explicitly requested kernel backends usable), the files the config names (DeepSpeed JSON,
prepared datasets and their vocabulary), the run directory and the tracking store. It reads and
writes nothing of the run (the write probe's temporary file is removed at once), so a rejected
run leaves an existing run directory as it was and creates no MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from data_pipeline.errors import DataConfigError
from data_pipeline.shards import Manifest
from kernels.backends import backend_problem
from parallel.deepspeed import deepspeed_config
from parallel.dist import launcher_world_size
from pretrain.config import KERNEL_BACKENDS, RunConfig, planned_reads, resolve_parallel_dims
from pretrain.config_errors import ConfigError
from pretrain.curriculum import resolve_stages
from pretrain.train_config import tracking_uri_problem


def preflight(cfg: RunConfig) -> None:
    """Raise one ConfigError naming every key or path of ``cfg`` that cannot work here."""
    device, problems = _device(cfg.train.device)
    problems += layout_problems(cfg)
    if device is not None:
        problems += kernel_problems(cfg, device)
    problems += deepspeed_problems(cfg)
    problems += shard_source_problems(cfg)
    problems += writable_dir_problems(Path(cfg.run.dir), "run.dir")
    problems += tracking_problems(cfg)
    if problems:
        raise ConfigError.from_problems("the run cannot start here", problems)


def _device(requested: str) -> tuple[torch.device | None, list[str]]:
    """The device ``train.device`` resolves to here (as ``init_distributed`` will), or why not."""
    if requested == "cuda" and not torch.cuda.is_available():
        return None, [
            "train.device=cuda: no CUDA device is available here (torch.cuda.is_available()"
            " is false); use train.device=cpu or auto"
        ]
    on_gpu = requested != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu"), []


def layout_problems(cfg: RunConfig) -> list[str]:
    """The parallel layout on the launcher's world size, and the curriculum placed on it."""
    try:
        dims = resolve_parallel_dims(cfg, launcher_world_size())
        tc = cfg.train
        resolve_stages(
            cfg.curriculum, tc.steps, tc.seq_len, tc.batch_size * tc.grad_accum * dims.dp_world
        )
    except ConfigError as err:
        return [str(err)]
    return []


def kernel_problems(cfg: RunConfig, device: torch.device) -> list[str]:
    """Explicitly requested kernel backends that cannot run on ``device`` (``auto`` always can)."""
    problems = []
    for op in KERNEL_BACKENDS:
        want = getattr(cfg.kernels, op)
        problem = None if want == "auto" else backend_problem(op, want, device)
        if problem is not None:
            problems.append(f"kernels.{op}={want}: {problem}; auto picks one that runs here")
    return problems


def deepspeed_problems(cfg: RunConfig) -> list[str]:
    """With ``parallel.backend=deepspeed``: the package and a JSON object without the keys the
    run config owns."""
    pc = cfg.parallel
    if pc.backend != "deepspeed":
        return []
    if importlib.util.find_spec("deepspeed") is None:
        return ["parallel.backend=deepspeed: the deepspeed package is not installed"]
    key = f"parallel.deepspeed_config={pc.deepspeed_config}"
    path = Path(pc.deepspeed_config)
    if not path.is_file():
        return [f"{key}: no such file (a relative path starts at {Path.cwd()})"]
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        return [f"{key}: cannot be read ({err})"]
    except json.JSONDecodeError as err:
        return [f"{key}: not valid JSON ({err})"]
    if not isinstance(data, dict):
        return [f"{key}: must hold a JSON object, got {type(data).__name__}"]
    try:
        deepspeed_config(str(path), 1, 1, 1.0, bf16=False)  # its own check of trainer-owned keys
    except ValueError as err:
        return [f"parallel.deepspeed_config: {err}"]
    return []


def shard_source_problems(cfg: RunConfig) -> list[str]:
    """Prepared datasets that are missing, lack a split the run reads, were prepared with another
    sequence length or tokenizer, or hold token ids beyond ``model.vocab_size``."""
    problems, tokenizers = [], {}
    for i, (src, reads) in enumerate(zip(cfg.data.sources, planned_reads(cfg), strict=True)):
        if src.path is None:
            continue
        key = f"data.sources[{i}].path={src.path}"
        manifest, problem = _load_manifest(Path(src.path), key)
        if manifest is None:
            problems.append(problem)
            continue
        tokenizers.setdefault(_tokenizer_id(manifest), []).append(f"data.sources[{i}]")
        if manifest.vocab_size > cfg.model.vocab_size:
            problems.append(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of"
                f" data.sources[{i}] ({src.path}: {manifest.vocab_size} ids); set"
                f" model.vocab_size >= {manifest.vocab_size}"
            )
        for split in sorted({split for split, _ in reads}):
            split_key = f"data.sources[{i}].split" if split == src.split else "data.eval_split"
            if split not in manifest.splits:
                problems.append(
                    f"{split_key}={split}: {src.path} has no such split; it has"
                    f" {sorted(manifest.splits)}"
                )
            elif not sum(s.samples for s in manifest.splits[split]):
                problems.append(f"{split_key}={split}: {src.path} holds no sample in it")
        other_lengths = sorted({seq_len for _, seq_len in reads} - {manifest.seq_len})
        if other_lengths:
            problems.append(
                f"{key}: prepared with seq_len={manifest.seq_len} but read at seq_len"
                f" {other_lengths} (train.seq_len or a curriculum stage's seq_len)"
            )
    if len(tokenizers) > 1:
        problems.append(
            "data.sources: prepared with different tokenizers (vocab, eos, pad, sha256):"
            f" {sorted(tokenizers.values())}"
        )
    return problems


def _load_manifest(root: Path, key: str) -> tuple[Manifest | None, str]:
    try:
        if not root.is_dir():
            return None, f"{key}: no such directory (a relative path starts at {Path.cwd()})"
        return Manifest.load(root), ""
    except DataConfigError as err:
        return None, f"{key}: {err}"
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged manifest.json
        return None, f"{key}: unreadable manifest.json ({type(err).__name__}: {err})"


def _tokenizer_id(m: Manifest) -> tuple:
    return (m.vocab_size, m.eos_id, m.pad_id, str(m.tokenizer.get("sha256")))


def writable_dir_problems(path: Path, key: str) -> list[str]:
    """Why this process cannot create files in directory ``path`` (made later if missing).

    Probes with a temporary file in ``path`` or, while it does not exist, in its nearest
    existing ancestor, removed at once: permission bits cannot tell (root, read-only mounts).
    """
    try:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            what = "is" if existing == path else f"would be inside {existing}, which is"
            return [f"{key}={path} {what} not a directory; give a directory path"]
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
    except (OSError, ValueError) as err:  # ValueError: e.g. a NUL byte in the path
        return [f"{key}={path}: cannot create files there ({err}); give a writable directory"]
    os.close(fd)
    os.unlink(probe)
    return []


def tracking_problems(cfg: RunConfig) -> list[str]:
    """The tracking store (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``; the default lives
    in the run directory): a scheme MLflow opens, and a local store's directory writable."""
    tc = cfg.tracking
    if not tc.enabled:
        return []
    key, uri = "tracking.uri", tc.uri
    if not uri:
        key, uri = "$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI", "")
        problem = tracking_uri_problem(uri, key) if uri else None
        if problem:
            return [problem + "; or set tracking.uri"]
    directory = _local_store_dir(uri)
    return writable_dir_problems(directory, key) if directory is not None else []


def _local_store_dir(uri: str) -> Path | None:
    """The directory a local MLflow store writes to, or None (remote, in memory, or default)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:  # a plain path (or "databricks", "scheme:opaque", which are not local)
        return Path(uri) if uri and ":" not in uri else None
    if scheme == "file":
        return Path(rest.partition("?")[0]) if rest else None
    if scheme.split("+")[0] == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        db = rest.removeprefix("/").partition("?")[0]
        return Path(db).parent if db and db != ":memory:" else None
    return None
