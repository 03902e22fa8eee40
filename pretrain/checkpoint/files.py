"""The on-disk layout of a checkpoint root and the file operations that keep it crash-consistent.

::

    root/
      step_00000120/          one complete checkpoint (only ever appears by rename)
        .metadata             DCP metadata (rank 0)
        __0_0.distcp ...      DCP shards (one or more per rank); or the DeepSpeed engine's files
        extra_rank0.pt ...    per-rank non-tensor state (torch.save, weights_only loadable)
        data_states.pt        every rank's data-reader state, gathered (for re-splitting)
        manifest.json         engine, step, world size, created time, {file: {size, sha256}}
      .tmp-step_00000140/     a checkpoint being written (ignored by loaders, cleaned up)
      latest                  text: the name of the newest complete checkpoint (written last)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
LATEST = "latest"
MANIFEST = "manifest.json"
DATA_STATES = "data_states.pt"
MANIFEST_FORMAT = 1
# what wrote the tensors (the manifest's "engine"; manifests without one are DCP's)
ENGINE_DCP = "dcp"
ENGINE_DEEPSPEED = "deepspeed"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_HASH_BLOCK = 8 << 20


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint directory name, or None for anything else."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def extra_name(rank: int) -> str:
    return f"extra_rank{rank}.pt"


def step_dirs(root: Path) -> list[Path]:
    """Complete-by-rename checkpoint directories under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [(parse_step(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def list_files(directory: Path) -> list[str]:
    """Every file under ``directory``, as sorted relative POSIX paths (subdirectories included:
    DeepSpeed's NVMe offload writes some)."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def check_file(path: Path, record: dict[str, Any], verify_hash: bool) -> str | None:
    """Why ``path`` does not match its manifest ``record`` (None when it does)."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path.name} has {size} bytes, the manifest says {record['size']} (truncated?)"
    if verify_hash and sha256_file(path) != record["sha256"]:
        return f"{path.name} does not match its sha256 in the manifest (corrupt)"
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable (no-op where directories can't sync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


LOW_SPACE_BYTES = 64 * 2**20  # below this, a failed write is most likely a full disk


def disk_full_hint(path: Path) -> str:
    """``" (no space left: N bytes free on the file system of PATH)"`` when that is likely
    the cause of a failed write; torch's writers report it as e.g. "unexpected pos 704 vs 598"."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        return ""
    if free >= LOW_SPACE_BYTES:
        return ""
    return f" (No space left on device? {free} bytes free on the file system of {path})"


def atomic_write(path: Path, data: bytes) -> None:
    """Write-temp + fsync + os.replace: readers see the old content or the new, never a mix."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed manifest of ``ckpt_dir``.

    Raises:
        ValueError: missing, unreadable or not a manifest of this format.
    """
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from exc
    keys = {"format", "step", "world_size", "files"}
    if not isinstance(manifest, dict) or not keys <= manifest.keys():
        raise ValueError(f"{MANIFEST} lacks one of {sorted(keys)}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{MANIFEST} has format {manifest['format']}, expected {MANIFEST_FORMAT}")
    return manifest


def read_latest(root: Path) -> str | None:
    """The directory name in ``root/latest``, or None if the file is missing or unreadable."""
    try:
        return (root / LATEST).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None
