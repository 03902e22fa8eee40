"""Checks that decide whether a checkpoint directory is complete (before the rename) and intact
(at load): manifest, file sizes and sha256 sums, and DCP's own metadata (for DCP checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint import files
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.files import DATA_STATES, MANIFEST


def check_extra_complete(tmp: Path, records: dict[str, dict[str, Any]], world: int) -> None:
    """Every rank's extra state and the gathered data states are in ``records``.

    Raises:
        CheckpointError: naming what is missing.
    """
    required = [DATA_STATES] + [files.extra_name(r) for r in range(world)]
    missing = [name for name in required if name not in records]
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is incomplete: missing {missing}")


def check_dcp_complete(tmp: Path, records: dict[str, dict[str, Any]]) -> None:
    """Every file and byte range DCP's metadata points at is in ``records``.

    Raises:
        CheckpointError: naming what is missing or shorter than DCP's metadata says.
    """
    if ".metadata" not in records:
        raise CheckpointError(f"checkpoint {tmp} is incomplete: missing ['.metadata']")
    metadata = FileSystemReader(str(tmp)).read_metadata()
    for info in (metadata.storage_data or {}).values():
        record = records.get(info.relative_path)
        if record is None or info.offset + info.length > record["size"]:
            raise CheckpointError(
                f"checkpoint {tmp} is incomplete: DCP data {info.relative_path} is missing or"
                " shorter than its metadata says"
            )


def read_checked_manifest(
    path: Path, engine: str = files.ENGINE_DCP
) -> tuple[str | None, dict[str, Any] | None]:
    """(problem, manifest) of checkpoint directory ``path`` written by ``engine``; exactly one of
    them is None."""
    try:
        manifest = files.read_manifest(path)
    except ValueError as exc:
        return str(exc), None
    if manifest["step"] != files.parse_step(path.name):
        return f"{MANIFEST} is for step {manifest['step']}, not {path.name}", None
    written_by = manifest.get("engine", files.ENGINE_DCP)
    if written_by != engine:
        return (
            f"it holds {written_by} engine state and this run loads {engine} checkpoints"
            " (parallel.backend changed?)"
        ), None
    if engine == files.ENGINE_DCP and ".metadata" not in manifest["files"]:
        return f"{MANIFEST} lists no DCP .metadata", None
    return None, manifest


def check_files(
    path: Path, manifest: dict[str, Any], rank: int, world: int, verify_hashes: bool
) -> str | None:
    """Rank ``rank``'s share (every ``world``-th file) of the size and sha256 checks."""
    names = sorted(manifest["files"])
    problems = []
    for name in names[rank::world]:
        found = files.check_file(path / name, manifest["files"][name], verify_hashes)
        if found is not None:
            problems.append(found)
    return "; ".join(problems) or None


def describe(exc: BaseException) -> str:
    """One line per failure; DCP's ``CheckpointException`` would print every rank's traceback."""
    if isinstance(exc, CheckpointException):
        return "; ".join(
            f"rank {rank}: {type(err).__name__}: {err}" for rank, (err, _) in exc.failures.items()
        )
    return f"{type(exc).__name__}: {exc}"
