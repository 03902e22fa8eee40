"""An async save holds the values of its save step, even when the next optimizer steps run while
the background write is still in progress.

The overlap is made certain, not likely: DCP's writer is stopped in the middle of its file (after
the first tensor is written, ``WriteGate``) and the training thread waits until it is there
before it steps the optimizer (parameters and AdamW moments change in place). Only then is the
writer released. A fresh model and optimizer load the checkpoint and must equal, bitwise, a copy
taken at the save step. A control with DCP's CPU staging switched off shows that the same drill
catches a writer that reads live tensors. Also on 2 gloo ranks with FSDP2.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem, state_dict_saver

from parallel.local_ranks import run_on_ranks
from pretrain.checkpoint import CheckpointManager, ModelOptimizerState
from pretrain.checkpoint import files as ckfiles
from tests.pretrain.dist_checkpoint_worker import build, full_state, train_step

# DCP says it "assumes" single-process intent on every no-process-group call; ours is explicit.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

GATE_TIMEOUT_S = 120  # generous: only reached when the drill itself is broken


class WriteGate:
    """Stops DCP's writer thread right after it has written its first tensor to the file.

    ``entered`` is set once the writer is stopped there (the file is partly written);
    it resumes when ``release`` is set.
    """

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stopped_in: str | None = None  # the writer thread's name

    def _wrap(self, real: Any) -> Any:
        def write_item(transforms, stream, data, write_item, *args, **kwargs):  # noqa: ANN001, ANN202
            result = real(transforms, stream, data, write_item, *args, **kwargs)
            if isinstance(data, torch.Tensor) and not self.entered.is_set():
                self.stopped_in = threading.current_thread().name
                self.entered.set()
                if not self.release.wait(GATE_TIMEOUT_S):
                    raise RuntimeError("the test never released the checkpoint writer")
            return result

        return write_item

    @contextmanager
    def installed(self) -> Iterator[WriteGate]:
        real = filesystem._write_item  # a module global, looked up at each call
        filesystem._write_item = self._wrap(real)
        try:
            yield self
        finally:
            self.release.set()  # never leave a writer stopped behind a failed test
            filesystem._write_item = real

    def wait_until_stopped(self) -> None:
        assert self.entered.wait(GATE_TIMEOUT_S), "the checkpoint writer never reached the gate"
        assert self.stopped_in != threading.current_thread().name, "the write was not async"


def app(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": ModelOptimizerState(model, opt)}


def changed_kinds(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Which kinds of entries (``model``, ``exp_avg``, ``exp_avg_sq``, ``step``) changed."""
    kinds = set()
    for key, value in before.items():
        if isinstance(value, torch.Tensor) and not torch.equal(value, after[key]):
            kinds.add("model" if key.startswith("model.") else key.rsplit(".", 1)[-1])
    return kinds


def differing(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Keys whose values are not bitwise equal (or missing / extra)."""
    assert sorted(expected) == sorted(got), set(expected) ^ set(got)
    return [
        key
        for key, value in expected.items()
        if not (
            torch.equal(value, got[key]) if isinstance(value, torch.Tensor) else value == got[key]
        )
    ]


def save_then_step_during_write(
    root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, group: Any, seed: int
) -> dict[str, Any]:
    """Async save at step 2, then two optimizer steps while the write is stopped mid-file.

    Returns the full state at the save step (on rank 0; collective under FSDP2).
    """
    manager = CheckpointManager(root, async_save=True, process_group=group)
    expected = full_state(model, opt)
    with WriteGate().installed() as gate:
        manager.save(2, app(model, opt), {"step": 2})
        gate.wait_until_stopped()
        # the write is in progress: this rank's data file is open, the checkpoint is not final
        assert list(root.glob(f"*/__{dist.get_rank() if group else 0}_*.distcp")), "no data file"
        assert not (root / ckfiles.step_dir_name(2)).exists()
        for i in range(2):
            train_step(model, opt, seed=seed + i)
        after = full_state(model, opt)
        if group is None or dist.get_rank() == 0:
            assert changed_kinds(expected, after) == {"model", "exp_avg", "exp_avg_sq", "step"}
        gate.release.set()
        manager.wait()
    assert (root / "latest").read_text() == ckfiles.step_dir_name(2)
    return expected


def load_fresh(root: Path, world: int, group: Any) -> dict[str, Any]:
    model, opt = build(seed=99, world=world)
    extra = CheckpointManager(root, process_group=group).load_latest(app(model, opt))
    assert extra is not None and extra["step"] == 2
    return full_state(model, opt)


def test_async_save_holds_the_save_step_while_the_next_steps_run(tmp_path: Path) -> None:
    model, opt = build(seed=0)
    for i in range(2):  # AdamW moments exist before the save
        train_step(model, opt, seed=i)
    expected = save_then_step_during_write(tmp_path, model, opt, None, seed=10)
    assert differing(expected, load_fresh(tmp_path, 1, None)) == []


class _NoCopyStager:
    """DCP staging switched off: the writer reads the live parameters and moments."""

    should_synchronize_after_execute = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return state_dict

    def close(self) -> None:
        pass


def test_the_drill_catches_a_writer_that_reads_live_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: without the CPU staging copy, the same drill finds values of a later step."""
    monkeypatch.setattr(state_dict_saver, "DefaultStager", _NoCopyStager)
    model, opt = build(seed=0)
    for i in range(2):
        train_step(model, opt, seed=i)
    expected = save_then_step_during_write(tmp_path, model, opt, None, seed=10)
    assert differing(expected, load_fresh(tmp_path, 1, None)) != []


def _two_rank_drill(rank: int, world: int, root: str) -> None:
    model, opt = build(seed=0, world=world)
    for i in range(2):
        train_step(model, opt, seed=100 * rank + i)  # rank-dependent data
    expected = save_then_step_during_write(Path(root), model, opt, dist.group.WORLD, seed=7 + rank)
    loaded = load_fresh(Path(root), world, dist.group.WORLD)
    if rank == 0:  # full_state gathers the whole state on rank 0
        assert differing(expected, loaded) == []


def test_async_save_holds_the_save_step_on_two_fsdp2_ranks(tmp_path: Path) -> None:
    run_on_ranks(2, _two_rank_drill, str(tmp_path))
