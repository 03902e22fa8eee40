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

The protocol (temporary directory, extra state, hashing, manifest, rename, scan, agreed fall-back)
is ``CheckpointRoot`` in root.py, shared with the DeepSpeed backend; this class adds DCP.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from pretrain.checkpoint import files, verify
from pretrain.checkpoint.comm import CheckpointComm
from pretrain.checkpoint.errors import CheckpointError
from pretrain.checkpoint.model_state import prepare_load
from pretrain.checkpoint.root import CheckpointRoot

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
        self.layout = CheckpointRoot(
            root,
            CheckpointComm(process_group, timeout_s),
            files.ENGINE_DCP,
            keep_last=keep_last,
            keep_every=keep_every,
            verify_hashes=verify_hashes,
            data_key=data_key,
        )
        self.root = self.layout.root
        self.comm = self.layout.comm
        self.async_save = async_save
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
        tmp = self.layout.begin(step)
        self.layout.write_extra(tmp, extra)
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
            raise CheckpointError(
                f"saving step {step} failed: {verify.describe(exc)}{files.disk_full_hint(tmp)}"
            ) from exc
        self.layout.publish(step, tmp, verify.check_dcp_complete)

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
            self.layout.discard(pending.tmp)
            raise CheckpointError(
                f"async save of step {pending.step} failed: {problem}"
                f"{files.disk_full_hint(pending.tmp)}"
            )
        self.layout.publish(pending.step, pending.tmp, verify.check_dcp_complete)

    def load_latest(self, app_state: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest valid checkpoint into ``app_state``; return this rank's extra state.

        None when there is no checkpoint at all; ``CheckpointError`` when checkpoints exist but
        none is usable. The keys added to the extra state: ``CheckpointRoot.load_newest``.
        """
        self.wait()
        return self.layout.load_newest(lambda path, _: self._load_tensors(path, app_state))

    def list_checkpoints(self) -> list[Path]:
        """Renamed (complete when written) checkpoint directories, oldest step first."""
        return files.step_dirs(self.root)

    # ------------------------------------------------------------------ load helpers

    def _load_tensors(self, path: Path, app_state: dict[str, Any]) -> str | None:
        """DCP-load checkpoint ``path`` into ``app_state``; the problem, or None."""
        view, planner = prepare_load(app_state)
        problem = None
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
        return problem
