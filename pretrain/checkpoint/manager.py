"""Crash-consistent DCP checkpoints: write to a temporary directory, verify, rename, move `latest`.

Save (collective over the process group):
  1. rank 0 clears leftover ``.tmp-*`` entries and creates ``.tmp-step_N/``;
  2. every rank writes ``extra_rank{r}.pt``; the data-reader states are gathered into
     ``data_states.pt``; DCP writes the tensors (in a background thread when ``async_save``, after
     staging them to CPU memory so later optimizer steps cannot change what is written);
  3. finalisation (at once, or in ``wait()`` / the next ``save``/``load_latest`` when async): the
     ranks hash the files between them, rank 0 checks that every file DCP's metadata references is
     there, writes ``manifest.json``, renames the directory to ``step_N/``, replaces ``latest`` and
     prunes old checkpoints (and any newer than N: a resume that skipped them abandoned them).

Load: the newest ``step_*`` directory whose manifest, file sizes, sha256 sums, extra state and DCP
load all check out. A directory only gets its final name after its manifest has been written and
verified, so a crash between the rename and ``latest`` leaves a complete checkpoint that the loader
uses (``latest`` is the pointer for readers outside this class). Bad checkpoints are skipped with a
warning naming them; if checkpoints exist but none is usable, loading fails instead of silently
starting from scratch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint import files, verify
from pretrain.checkpoint.comm import CheckpointComm
from pretrain.checkpoint.errors import CheckpointError, CheckpointWarning
from pretrain.checkpoint.files import DATA_STATES, LATEST, MANIFEST, TMP_PREFIX
from pretrain.checkpoint.model_state import prepare_load
from pretrain.checkpoint.state import load_extra, serialize_extra

logger = logging.getLogger("pretrain.checkpoint")

# DCP warns on every single-process save/load that it "assumes" single-process intent; ours is
# explicit (no_dist=True), so the warning only adds noise to every checkpoint of a 1-process run.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


@dataclass
class _PendingSave:
    step: int
    tmp: Path
    future: Future


class CheckpointManager:
    """Saves and restores DCP checkpoints under ``root``; see the module docstring for the layout.

    Args:
        root: directory holding ``step_*`` checkpoints and ``latest``.
        keep_last: keep this many most recent checkpoints.
        keep_every: also keep, forever, every checkpoint whose step is a multiple of this.
        async_save: write tensors in a background thread; the checkpoint is finalised in
            ``wait()`` or at the start of the next ``save``/``load_latest``.
        process_group: the training group, or None for a single process. The constructor is then
            collective (it creates the manager's own gloo group), as are ``save``, ``wait`` and
            ``load_latest``.
        verify_hashes: check sha256 sums at load (else sizes only); the ranks share the reading.
        data_key: the key of the data-reader state in ``extra``, gathered into ``all_ranks``.
        timeout_s: timeout of the checkpoint group's collectives (None: torch's default).
    """

    def __init__(
        self,
        root: Path,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = False,
        process_group: Any = None,
        verify_hashes: bool = True,
        data_key: str = "data",
        timeout_s: float | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {keep_every}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.verify_hashes = verify_hashes
        self.data_key = data_key
        self.comm = CheckpointComm(process_group, timeout_s)
        self._pending: _PendingSave | None = None

    # ------------------------------------------------------------------ public API

    def save(self, step: int, app_state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Write checkpoint ``step``: DCP for ``app_state``, this rank's ``extra`` beside it.

        Args:
            step: the optimizer step; names the directory ``step_{step:08d}``.
            app_state: DCP state (``Stateful`` objects such as ``ModelOptimizerState``, tensors,
                plain values), identical keys on every rank.
            extra: this rank's small state (RNG, data position, counters, config); must load
                with ``torch.load(weights_only=True)`` (checked here). ``extra[data_key]`` of
                every rank is gathered for ``load_latest``'s ``all_ranks``.
        """
        self.wait()
        name = files.step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        self.comm.on_main(lambda: self._prepare_tmp(tmp))
        self._write_extra(tmp, extra)
        no_dist = self.comm.group is None
        if self.async_save:
            response = dcp.async_save(
                app_state, checkpoint_id=tmp, process_group=self.comm.group, no_dist=no_dist
            )
            future = getattr(response, "upload_completion", response)
            self._pending = _PendingSave(step, tmp, future)
            return
        try:
            dcp.save(app_state, checkpoint_id=tmp, process_group=self.comm.group, no_dist=no_dist)
        except CheckpointException as exc:  # a BaseException: make it catchable as an Exception
            raise CheckpointError(f"saving step {step} failed: {verify.describe(exc)}") from exc
        self._finalize(step, tmp)

    def wait(self) -> None:
        """Finish a pending async save (collective). A no-op when nothing is pending.

        Raises:
            CheckpointError: the background write failed on some rank (its temporary directory is
                removed; earlier checkpoints are untouched).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        problem = None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:
            problem = f"rank {self.comm.rank}: {verify.describe(exc)}"
        problem = self.comm.agree(problem)
        if problem is not None:
            self.comm.on_main(lambda: shutil.rmtree(pending.tmp, ignore_errors=True))
            raise CheckpointError(f"async save of step {pending.step} failed: {problem}")
        self._finalize(pending.step, pending.tmp)

    def load_latest(self, app_state: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest valid checkpoint into ``app_state``; return this rank's extra state.

        Returns:
            None when ``root`` holds no checkpoint at all (fresh start). Otherwise the ``extra``
            saved by this rank (by rank 0 when this rank did not exist at save time), plus
            ``saved_world_size``, ``all_ranks`` (every saved rank's ``extra[data_key]``, in rank
            order), ``checkpoint_step`` and ``checkpoint_path``.

        Raises:
            CheckpointError: checkpoints exist but none is usable (never a silent fresh start).
        """
        self.wait()
        candidates = self.comm.on_main(self._scan)
        failures = []
        for name in candidates:
            problem, extra = self._try_load(name, app_state)
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

    def list_checkpoints(self) -> list[Path]:
        """Renamed (complete when written) checkpoint directories, oldest step first."""
        return files.step_dirs(self.root)

    # ------------------------------------------------------------------ save helpers

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

    def _write_extra(self, tmp: Path, extra: dict[str, Any]) -> None:
        problem, data_state = None, None
        try:
            blob = serialize_extra(extra)
            files.write_synced(tmp / files.extra_name(self.comm.rank), blob)
            data_state = extra.get(self.data_key)
        except Exception as exc:
            problem = f"rank {self.comm.rank}: {exc}"
        gathered = self.comm.all_gather((problem, data_state))
        problems = [p for p, _ in gathered if p is not None]
        if problems:
            raise CheckpointError("could not write the extra state: " + "; ".join(problems))
        states = [state for _, state in gathered]
        self.comm.on_main(lambda: files.write_synced(tmp / DATA_STATES, serialize_extra(states)))

    def _finalize(self, step: int, tmp: Path) -> None:
        names = self.comm.on_main(lambda: sorted(p.name for p in tmp.iterdir() if p.is_file()))
        records, problem = {}, None
        try:
            for name in names[self.comm.rank :: self.comm.world]:
                records[name] = files.file_record(tmp / name)
        except OSError as exc:
            problem = f"rank {self.comm.rank}: {exc}"
        gathered = self.comm.all_gather((problem, records))
        problems = [p for p, _ in gathered if p is not None]
        if problems:
            raise CheckpointError(f"could not hash checkpoint {tmp}: " + "; ".join(problems))
        merged = {name: rec for _, part in gathered for name, rec in part.items()}
        self.comm.on_main(lambda: self._publish(step, tmp, merged))

    def _publish(self, step: int, tmp: Path, records: dict[str, dict[str, Any]]) -> None:
        """Rank 0: manifest, rename, ``latest`` (last), prune."""
        verify.check_complete(tmp, records, self.comm.world)
        manifest = {
            "format": files.MANIFEST_FORMAT,
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

    # ------------------------------------------------------------------ load helpers

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

    def _try_load(self, name: str, app_state: dict[str, Any]) -> tuple[str | None, Any]:
        """(problem, extra): verify files, read the extra state, then load the tensors."""
        path = self.root / name
        problem, manifest = self.comm.on_main(lambda: verify.read_checked_manifest(path))
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
        view, planner = prepare_load(app_state)
        try:
            dcp.load(
                view,
                checkpoint_id=path,
                planner=planner,
                process_group=self.comm.group,
                no_dist=self.comm.group is None,
            )
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            problem = f"loading the tensors failed: {verify.describe(exc)}"
        # DCP replaces plain (non-Stateful) entries in the dict it was given
        app_state.update({k: v for k, v in view.items() if k not in planner.optimizer_keys})
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
