"""The crash-consistent protocol of one checkpoint root, whatever writes the tensors.

``CheckpointManager`` (DCP) and the DeepSpeed backend's checkpoints both use it; each only says
how its tensors are written and loaded, and what makes its directory complete.

Save (every step collective over the checkpoint group):
  ``begin``: rank 0 clears leftover ``.tmp-*`` entries and creates ``.tmp-step_N/``;
  ``write_extra``: every rank's ``extra_rank{r}.pt`` (weights_only loadable) and, gathered by rank
  0, ``data_states.pt``; the caller then writes its tensors into the directory;
  ``publish``: the ranks hash the files between them; rank 0 checks completeness, writes
  ``manifest.json`` (last), renames the directory to ``step_N/``, replaces ``latest`` and prunes.

Load (``load_newest``): rank 0 lists the candidates, newest first; for each, the ranks verify the
manifest, sizes and sha256 sums (sharing the reading), read their extra state, then run the
caller's load; every one of these outcomes is agreed over all ranks, so a problem on any rank
makes every rank skip that checkpoint together (with a warning naming it) and try the previous
one. Checkpoints that exist but none usable raise ``CheckpointError``, never a fresh start.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import files, verify
from pretrain.checkpoint.comm import CheckpointComm
from pretrain.checkpoint.errors import CheckpointError, CheckpointWarning
from pretrain.checkpoint.files import DATA_STATES, LATEST, MANIFEST, TMP_PREFIX
from pretrain.checkpoint.state import load_extra, serialize_extra

logger = logging.getLogger("pretrain.checkpoint")

# (directory being published, {relative file name: {size, sha256}}) -> raises if incomplete
CompletenessCheck = Callable[[Path, dict[str, dict[str, Any]]], None]
# (checkpoint directory, its verified manifest) -> this rank's problem, or None when loaded
LoadTensors = Callable[[Path, dict[str, Any]], "str | None"]


class CheckpointRoot:
    """The ``step_*`` directories, ``latest`` and temporary directories under ``root``.

    Args:
        root: directory holding ``step_*`` checkpoints and ``latest``.
        comm: the checkpoint group's collectives (``CheckpointComm``).
        engine: what writes the tensors (``files.ENGINE_DCP`` or ``files.ENGINE_DEEPSPEED``);
            recorded in the manifest, and a checkpoint of another engine is skipped at load.
        keep_last: keep this many most recent checkpoints.
        keep_every: also keep, forever, every checkpoint whose step is a multiple of this.
        verify_hashes: check sha256 sums at load (else sizes only).
        data_key: the key of the data-reader state in ``extra``, gathered into ``all_ranks``.
    """

    def __init__(
        self,
        root: Path,
        comm: CheckpointComm,
        engine: str = files.ENGINE_DCP,
        keep_last: int = 3,
        keep_every: int | None = None,
        verify_hashes: bool = True,
        data_key: str = "data",
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        self.root = Path(root)
        self.comm = comm
        self.engine = engine
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.verify_hashes = verify_hashes
        self.data_key = data_key

    # ------------------------------------------------------------------ save

    def begin(self, step: int) -> Path:
        """Create (rank 0) and return the temporary directory of checkpoint ``step``."""
        tmp = self.root / f"{TMP_PREFIX}{files.step_dir_name(step)}"
        self.comm.on_main(lambda: self._prepare_tmp(tmp))
        return tmp

    def write_extra(self, tmp: Path, extra: dict[str, Any]) -> None:
        """This rank's ``extra`` (weights_only loadable) and every rank's data state (rank 0).

        Raises:
            CheckpointError: on every rank, naming the ranks whose extra state was refused.
        """
        problem, data_state = None, None
        try:
            blob = serialize_extra(extra)
            files.write_synced(tmp / files.extra_name(self.comm.rank), blob)
            data_state = extra.get(self.data_key)
        except Exception as exc:
            problem = f"rank {self.comm.rank}: {exc}"
        states = self._gather_or_raise(problem, data_state, "could not write the extra state", tmp)
        self.comm.on_main(lambda: files.write_synced(tmp / DATA_STATES, serialize_extra(states)))

    def publish(self, step: int, tmp: Path, check_complete: CompletenessCheck) -> None:
        """Hash ``tmp``'s files (shared), then rank 0: check, manifest, rename, ``latest``, prune.

        Raises:
            CheckpointError: a file could not be hashed, or ``check_complete`` refused the
                directory (on rank 0; the others get ``CheckpointCollectiveError``).
        """
        names = self.comm.on_main(lambda: files.list_files(tmp))
        records, problem = {}, None
        try:
            for name in names[self.comm.rank :: self.comm.world]:
                records[name] = files.file_record(tmp / name)
        except OSError as exc:
            problem = f"rank {self.comm.rank}: {exc}"
        parts = self._gather_or_raise(problem, records, f"could not hash checkpoint {tmp}", tmp)
        merged = {name: rec for part in parts for name, rec in part.items()}
        self.comm.on_main(lambda: self._publish(step, tmp, merged, check_complete))

    def _gather_or_raise(self, problem: str | None, value: Any, failed: str, tmp: Path) -> list:
        """Every rank's ``value`` (collective); a ``problem`` on any rank raises, on every rank,
        ``CheckpointError`` naming them all (with a hint when ``tmp``'s disk is full)."""
        gathered = self.comm.all_gather((problem, value))
        problems = [p for p, _ in gathered if p is not None]
        if problems:
            raise CheckpointError(f"{failed}: " + "; ".join(problems) + files.disk_full_hint(tmp))
        return [v for _, v in gathered]

    def discard(self, tmp: Path) -> None:
        """Remove an unfinished checkpoint directory (rank 0; collective)."""
        self.comm.on_main(lambda: shutil.rmtree(tmp, ignore_errors=True))

    def _prepare_tmp(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        tmp.mkdir()

    def _clean_tmp(self) -> None:
        """Remove leftovers of interrupted saves (only called when no save of ours is pending)."""
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            logger.info("removing leftover %s", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _publish(
        self,
        step: int,
        tmp: Path,
        records: dict[str, dict[str, Any]],
        check_complete: CompletenessCheck,
    ) -> None:
        """Rank 0: completeness, manifest, rename, ``latest`` (last), prune."""
        verify.check_extra_complete(tmp, records, self.comm.world)
        check_complete(tmp, records)
        manifest = {
            "format": files.MANIFEST_FORMAT,
            "engine": self.engine,
            "step": step,
            "world_size": self.comm.world,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time(),
            "torch_version": torch.__version__,
            "files": records,
        }
        files.write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        files.fsync_dir(tmp)
        final = self.root / files.step_dir_name(step)
        replaced = None
        if final.exists():  # the same step saved again (e.g. after falling back past a bad one)
            replaced = self.root / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)
        tmp.rename(final)
        files.fsync_dir(self.root)
        files.atomic_write(self.root / LATEST, final.name.encode())
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune(step)

    def _prune(self, saved_step: int) -> None:
        dirs = files.step_dirs(self.root)
        # a newer step than the one just saved belongs to an abandoned timeline (e.g. the corrupt
        # checkpoint a resume skipped); left there, a later resume could jump back into it
        for path in [p for p in dirs if files.parse_step(p.name) > saved_step]:
            self._warn(f"removing {path}: newer than step {saved_step}, which supersedes it")
            shutil.rmtree(path, ignore_errors=True)
        dirs = [p for p in dirs if files.parse_step(p.name) <= saved_step]
        keep = {p.name for p in dirs[-self.keep_last :]}
        keep.add(files.read_latest(self.root))
        if self.keep_every is not None:
            keep |= {p.name for p in dirs if files.parse_step(p.name) % self.keep_every == 0}
        for path in dirs:
            if path.name not in keep:
                logger.info("pruning checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load_newest(self, load: LoadTensors) -> dict[str, Any] | None:
        """Load the newest checkpoint that every rank verifies and loads; return this rank's extra.

        Args:
            load: loads the tensors of a verified checkpoint on this rank; returns a problem
                (or raises), which every rank then learns, or None.

        Returns:
            None when ``root`` holds no checkpoint at all (fresh start). Otherwise the ``extra``
            saved by this rank (by rank 0 when this rank did not exist at save time), plus
            ``saved_world_size``, ``all_ranks`` (every saved rank's ``extra[data_key]``, in rank
            order), ``checkpoint_step`` and ``checkpoint_path``.

        Raises:
            CheckpointError: checkpoints exist but none is usable (never a silent fresh start).
        """
        candidates = self.comm.on_main(self._scan)
        failures = []
        for name in candidates:
            problem, extra = self._try_load(name, load)
            if problem is None:
                if failures and self.comm.is_main:
                    logger.warning("resumed from %s after skipping %s", name, ", ".join(failures))
                return extra
            self._warn(f"checkpoint {self.root / name} is unusable and was skipped: {problem}")
            failures.append(f"{name} ({problem})")
        if not candidates:
            return None
        raise CheckpointError(
            f"checkpoints exist in {self.root} but none can be loaded; refusing to start from"
            " scratch (move the directory away to start a fresh run):\n  " + "\n  ".join(failures)
        )

    def _warn(self, message: str) -> None:
        if self.comm.is_main:
            warnings.warn(message, CheckpointWarning, stacklevel=3)
            logger.warning(message)

    def _scan(self) -> list[str]:
        """Rank 0: candidate directory names, newest first."""
        if not self.root.is_dir():
            return []
        self._clean_tmp()
        names = [p.name for p in files.step_dirs(self.root)][::-1]
        latest = files.read_latest(self.root)
        if not names:
            if (self.root / LATEST).exists():
                raise CheckpointError(
                    f"{self.root / LATEST} exists (points to {latest!r}) but there are no"
                    " checkpoint directories; refusing to start from scratch"
                )
            return []
        if latest is None:
            self._warn(f"{self.root / LATEST} is missing or unreadable; scanning {self.root}")
        elif latest not in names:
            self._warn(f"{self.root / LATEST} names {latest!r}, which does not exist; scanning")
        elif latest != names[0]:
            logger.info(
                "%s is newer than latest (%s): a save was renamed but the pointer not yet moved",
                names[0],
                latest,
            )
        return names

    def _try_load(self, name: str, load: LoadTensors) -> tuple[str | None, Any]:
        """(problem, extra): verify files, read the extra state, then ``load`` the tensors."""
        path = self.root / name
        problem, manifest = self.comm.on_main(
            lambda: verify.read_checked_manifest(path, self.engine)
        )
        if problem is None:
            mine = verify.check_files(
                path, manifest, self.comm.rank, self.comm.world, self.verify_hashes
            )
            problem = self.comm.agree(mine)
        if problem is not None:
            return problem, None
        extra, problem = self._read_extra(path, manifest)
        problem = self.comm.agree(problem)
        if problem is not None:
            return problem, None
        try:
            problem = load(path, manifest)
        except Exception as exc:  # one rank's failure must reach every rank, not end this one
            problem = f"rank {self.comm.rank}: loading the tensors failed: {verify.describe(exc)}"
        return self.comm.agree(problem), extra

    def _read_extra(self, path: Path, manifest: dict[str, Any]) -> tuple[Any, str | None]:
        """(extra, problem): this rank's extra (rank 0's for ranks new since the save)."""
        saved_world = int(manifest["world_size"])
        rank = self.comm.rank if self.comm.rank < saved_world else 0
        try:
            extra = load_extra(path / files.extra_name(rank))
            all_ranks = load_extra(path / DATA_STATES)
        except Exception as exc:
            return None, f"rank {self.comm.rank}: extra state unreadable: {exc}"
        if not isinstance(extra, dict) or not isinstance(all_ranks, list):
            return None, f"rank {self.comm.rank}: extra state has an unexpected type"
        if len(all_ranks) != saved_world:
            return None, f"rank {self.comm.rank}: extra state has an unexpected shape"
        if saved_world != self.comm.world and self.comm.is_main:
            logger.info(
                "checkpoint %s was saved by %d ranks, loading on %d",
                path.name,
                saved_world,
                self.comm.world,
            )
        extra = dict(extra)
        extra.update(
            saved_world_size=saved_world,
            all_ranks=list(all_ranks),
            checkpoint_step=int(manifest["step"]),
            checkpoint_path=str(path),
        )
        return extra, None
