"""Checkpoint manager: round trip, pruning, crash consistency, corruption fallback, async
snapshot isolation, safetensors export, and FSDP2 resharding between 2 ranks and 1 (gloo, CPU)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from pretrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWarning,
    ModelOptimizerState,
    capture_rng_state,
    export_safetensors,
    load_safetensors_export,
    restore_rng_state,
)
from pretrain.checkpoint import files as ckfiles
from tests.pretrain.dist_checkpoint_worker import build, full_state, train_step

# DCP says it "assumes" single-process intent on every no-process-group call; ours is explicit.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_checkpoint_worker.py")


def trained(seed: int = 0, steps: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = build(seed)
    for i in range(steps):
        train_step(model, opt, seed=1000 * seed + i)
    return model, opt


def app(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": ModelOptimizerState(model, opt)}


def assert_state_equal(expected: dict, got: dict) -> None:
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


def assert_states_differ(a: dict, b: dict) -> None:
    assert any(
        isinstance(v, torch.Tensor) and not torch.equal(v, b[k]) for k, v in a.items() if k in b
    )


def save_steps(root: Path, steps, **kwargs) -> dict[int, dict]:
    """Save a model that trains one step between checkpoints; return each step's full state."""
    model, opt = build(0)
    manager = CheckpointManager(root, **kwargs)
    states = {}
    for step in steps:
        train_step(model, opt, seed=step)
        manager.save(step, app(model, opt), {"step": step, "data": {"pos": step}})
        states[step] = full_state(model, opt)
    manager.wait()
    return states


def load_fresh(root: Path, **kwargs) -> tuple[dict | None, dict]:
    model, opt = build(seed=99)
    extra = CheckpointManager(root, **kwargs).load_latest(app(model, opt))
    return extra, full_state(model, opt)


# ---------------------------------------------------------------------- round trip, RNG, layout


def test_round_trip_restores_model_optimizer_and_extra(tmp_path: Path) -> None:
    model, opt = trained(steps=2)
    expected = full_state(model, opt)
    extra = {"data": {"epoch": 1, "offset": 7}, "run_id": "abc", "rng": capture_rng_state()}
    CheckpointManager(tmp_path).save(5, app(model, opt), extra)

    fresh, fresh_opt = build(seed=99)
    assert_states_differ(expected, full_state(fresh, fresh_opt))
    loaded = CheckpointManager(tmp_path).load_latest(app(fresh, fresh_opt))
    assert_state_equal(expected, full_state(fresh, fresh_opt))
    assert loaded["data"] == extra["data"] and loaded["run_id"] == "abc"
    assert loaded["saved_world_size"] == 1 and loaded["all_ranks"] == [extra["data"]]
    assert loaded["checkpoint_step"] == 5
    # training continues identically from the restored optimizer state
    train_step(model, opt, seed=7)
    train_step(fresh, fresh_opt, seed=7)
    assert_state_equal(full_state(model, opt), full_state(fresh, fresh_opt))


def test_layout_manifest_and_latest(tmp_path: Path) -> None:
    save_steps(tmp_path, [3])
    ckpt = tmp_path / "step_00000003"
    assert (tmp_path / "latest").read_text() == "step_00000003"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["created"]
    on_disk = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {".metadata", "extra_rank0.pt", "data_states.pt"} <= on_disk
    for name, record in manifest["files"].items():
        assert record == ckfiles.file_record(ckpt / name)
    assert not list(tmp_path.glob(".tmp-*"))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in NumPy's legacy state
    model, opt = trained()
    CheckpointManager(tmp_path).save(1, app(model, opt), {"rng": capture_rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    extra = CheckpointManager(tmp_path).load_latest(app(*build(1)))
    restore_rng_state(extra["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(2), np.random.randn())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]
    assert np.array_equal(expected[2], got[2]) and expected[3] == got[3]


def test_extra_that_cannot_load_safely_is_refused_at_save(tmp_path: Path) -> None:
    model, opt = trained()
    with pytest.raises(CheckpointError, match="weights_only"):
        CheckpointManager(tmp_path).save(1, app(model, opt), {"bad": np.zeros(3)})
    assert CheckpointManager(tmp_path).list_checkpoints() == []


# ---------------------------------------------------------------------- parameters without state


class WithSpare(nn.Module):
    """A used path and a spare one that gets no gradient until ``use_spare`` is set, like a
    component that a later curriculum stage switches on."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)
        self.use_spare = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.main(x)
        return y + torch.tanh(self.spare(x)) if self.use_spare else y


def spare_model(seed: int) -> tuple[WithSpare, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = WithSpare()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def spare_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_parameters_without_optimizer_state_resume_exactly(tmp_path: Path) -> None:
    """The spare path has no AdamW state at save time; a fresh optimizer must load the
    checkpoint anyway and leave that path stateless, so switching it on later matches the
    uninterrupted run bit for bit."""
    model, opt = spare_model(0)
    for i in range(2):
        spare_step(model, opt, seed=i)
    CheckpointManager(tmp_path).save(2, app(model, opt), {})
    fresh, fresh_opt = spare_model(5)
    CheckpointManager(tmp_path).load_latest(app(fresh, fresh_opt))
    assert not fresh_opt.state.get(fresh.spare.weight)
    assert_state_equal(full_state(model, opt), full_state(fresh, fresh_opt))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m.use_spare = True
        for i in range(2, 4):
            spare_step(m, o, seed=i)
    assert_state_equal(full_state(model, opt), full_state(fresh, fresh_opt))


def test_saving_before_the_first_step_leaves_the_optimizer_untouched(tmp_path: Path) -> None:
    model, opt = spare_model(0)
    CheckpointManager(tmp_path).save(0, app(model, opt), {})
    assert not opt.state  # no zero-lr "initialisation" step left behind (AdamW step count)
    fresh, fresh_opt = spare_model(5)
    CheckpointManager(tmp_path).load_latest(app(fresh, fresh_opt))
    assert not fresh_opt.state
    for m, o in ((model, opt), (fresh, fresh_opt)):
        spare_step(m, o, seed=0)
    reference, reference_opt = spare_model(0)
    spare_step(reference, reference_opt, seed=0)
    assert_state_equal(full_state(reference, reference_opt), full_state(model, opt))
    assert_state_equal(full_state(reference, reference_opt), full_state(fresh, fresh_opt))


def test_rollback_into_a_used_optimizer_restores_the_saved_set_of_states(tmp_path: Path) -> None:
    model, opt = spare_model(0)
    spare_step(model, opt, seed=0)
    manager = CheckpointManager(tmp_path)
    manager.save(1, app(model, opt), {})
    expected = full_state(model, opt)
    model.use_spare = True
    spare_step(model, opt, seed=1)
    assert opt.state[model.spare.weight]
    manager.load_latest(app(model, opt))
    assert not opt.state.get(model.spare.weight)
    assert_state_equal(expected, full_state(model, opt))


def test_frozen_parameter_keeps_its_optimizer_state(tmp_path: Path) -> None:
    model, opt = spare_model(0)
    model.use_spare = True
    spare_step(model, opt, seed=0)
    model.spare.weight.requires_grad_(False)  # a stage freezes it
    spare_step(model, opt, seed=1)
    CheckpointManager(tmp_path).save(2, app(model, opt), {})
    fresh, fresh_opt = spare_model(5)
    fresh.use_spare = True
    fresh.spare.weight.requires_grad_(False)
    CheckpointManager(tmp_path).load_latest(app(fresh, fresh_opt))
    assert not fresh.spare.weight.requires_grad
    saved = opt.state[model.spare.weight]["exp_avg"]
    assert torch.equal(fresh_opt.state[fresh.spare.weight]["exp_avg"], saved)
    for m, o in ((model, opt), (fresh, fresh_opt)):  # a later stage unfreezes it
        m.spare.weight.requires_grad_(True)
        spare_step(m, o, seed=2)
    assert_state_equal(full_state(model, opt), full_state(fresh, fresh_opt))


# ---------------------------------------------------------------------- pruning


def test_keep_last_and_keep_every(tmp_path: Path) -> None:
    save_steps(tmp_path, range(1, 10), keep_last=2, keep_every=4)
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.list_checkpoints()] == [
        "step_00000004",
        "step_00000008",
        "step_00000009",
    ]
    assert (tmp_path / "latest").read_text() == "step_00000009"


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    model, opt = trained()
    manager = CheckpointManager(tmp_path)
    manager.save(4, app(model, opt), {"version": 1})
    train_step(model, opt, seed=5)
    manager.save(4, app(model, opt), {"version": 2})
    extra, state = load_fresh(tmp_path)
    assert extra["version"] == 2
    assert_state_equal(full_state(model, opt), state)


# ---------------------------------------------------------------------- crash consistency


def test_latest_is_written_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    """Crash right before `latest` moves: the renamed directory is complete (manifest verified),
    so the loader resumes from it; `latest` still names the previous one."""
    states = save_steps(tmp_path, [1])
    real_atomic_write = ckfiles.atomic_write

    def crash_on_latest(path: Path, data: bytes) -> None:
        if path.name == "latest":
            assert (tmp_path / "step_00000002" / "manifest.json").is_file()
            assert not (tmp_path / ".tmp-step_00000002").exists()
            raise KeyboardInterrupt("simulated crash before latest")
        real_atomic_write(path, data)

    monkeypatch.setattr(ckfiles, "atomic_write", crash_on_latest)
    model, opt = build(0)
    train_step(model, opt, seed=1)
    train_step(model, opt, seed=2)
    with pytest.raises(KeyboardInterrupt):
        CheckpointManager(tmp_path).save(2, app(model, opt), {"step": 2})
    monkeypatch.setattr(ckfiles, "atomic_write", real_atomic_write)
    assert (tmp_path / "latest").read_text() == "step_00000001"
    extra, state = load_fresh(tmp_path)
    assert extra["step"] == 2
    assert_state_equal(full_state(model, opt), state)
    assert_states_differ(states[1], state)


def test_crash_before_rename_leaves_only_a_tmp_dir(tmp_path: Path, monkeypatch) -> None:
    states = save_steps(tmp_path, [1])
    real_rename = Path.rename

    def crash_on_rename(self: Path, target):
        if self.name.startswith(".tmp-step_"):
            raise KeyboardInterrupt("simulated crash before rename")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_rename)
    model, opt = trained(seed=3)
    with pytest.raises(KeyboardInterrupt):
        CheckpointManager(tmp_path).save(2, app(model, opt), {"step": 2})
    monkeypatch.setattr(Path, "rename", real_rename)
    assert (tmp_path / ".tmp-step_00000002").is_dir()
    extra, state = load_fresh(tmp_path)
    assert extra["step"] == 1
    assert_state_equal(states[1], state)
    assert not (tmp_path / ".tmp-step_00000002").exists()  # leftovers are cleaned


# ---------------------------------------------------------------------- corruption


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_shard": lambda d: truncate(d / "__0_0.distcp"),
    "flipped_byte": lambda d: flip_byte(d / "__0_0.distcp"),
    "flipped_metadata": lambda d: flip_byte(d / ".metadata"),
    "truncated_extra": lambda d: truncate(d / "extra_rank0.pt"),
    "missing_manifest": lambda d: (d / "manifest.json").unlink(),
    "garbage_manifest": lambda d: (d / "manifest.json").write_text("{not json"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path, corruption: str) -> None:
    states = save_steps(tmp_path, [1, 2])
    CORRUPTIONS[corruption](tmp_path / "step_00000002")
    with pytest.warns(CheckpointWarning, match="step_00000002"):
        extra, state = load_fresh(tmp_path)
    assert extra["step"] == 1
    assert_state_equal(states[1], state)


def test_size_only_verification_still_catches_truncation(tmp_path: Path) -> None:
    states = save_steps(tmp_path, [1, 2])
    truncate(tmp_path / "step_00000002" / "__0_0.distcp")
    with pytest.warns(CheckpointWarning, match="step_00000002.*truncated"):
        extra, state = load_fresh(tmp_path, verify_hashes=False)
    assert extra["step"] == 1
    assert_state_equal(states[1], state)


def test_checkpoint_whose_dcp_load_fails_is_skipped(tmp_path: Path) -> None:
    states = save_steps(tmp_path, [1])
    other = nn.Linear(3, 3)  # different parameter names and shapes
    other_opt = torch.optim.AdamW(other.parameters())
    CheckpointManager(tmp_path).save(2, app(other, other_opt), {"step": 2})
    with pytest.warns(CheckpointWarning, match="step_00000002.*loading the tensors failed"):
        extra, state = load_fresh(tmp_path)
    assert extra["step"] == 1
    assert_state_equal(states[1], state)


def test_saving_after_a_fallback_removes_the_abandoned_newer_checkpoint(tmp_path: Path) -> None:
    """After resuming from step 2 past a corrupt step 4, the next save (step 3) supersedes step 4:
    it must neither be kept by pruning in place of a valid one nor resumed from later."""
    save_steps(tmp_path, [1, 2, 4])
    truncate(tmp_path / "step_00000004" / "__0_0.distcp")
    model, opt = build(99)
    manager = CheckpointManager(tmp_path, keep_last=2)
    with pytest.warns(CheckpointWarning, match="step_00000004"):
        assert manager.load_latest(app(model, opt))["step"] == 2
    train_step(model, opt, seed=3)
    with pytest.warns(CheckpointWarning, match="removing .*step_00000004"):
        manager.save(3, app(model, opt), {"step": 3})
    assert [p.name for p in manager.list_checkpoints()] == ["step_00000002", "step_00000003"]


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    save_steps(tmp_path, [1, 2])
    flip_byte(tmp_path / "step_00000001" / "__0_0.distcp")
    truncate(tmp_path / "step_00000002" / "__0_0.distcp")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as info:
        load_fresh(tmp_path)
    assert "step_00000001" in str(info.value) and "step_00000002" in str(info.value)


def test_latest_without_any_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("step_00000007")
    with pytest.raises(CheckpointError, match="no checkpoint directories"):
        load_fresh(tmp_path)


def test_empty_or_missing_root_means_fresh_start(tmp_path: Path) -> None:
    assert load_fresh(tmp_path / "does-not-exist")[0] is None
    assert load_fresh(tmp_path)[0] is None
    (tmp_path / ".tmp-step_00000001").mkdir()  # an interrupted first save is not a checkpoint
    (tmp_path / ".tmp-step_00000001" / "__0_0.distcp").write_bytes(b"partial")
    assert load_fresh(tmp_path)[0] is None
    assert not (tmp_path / ".tmp-step_00000001").exists()


@pytest.mark.parametrize("latest", [None, "garbage\n", "step_00000042"])
def test_missing_or_garbage_latest_scans_for_newest(tmp_path: Path, latest: str | None) -> None:
    states = save_steps(tmp_path, [1, 2])
    if latest is None:
        (tmp_path / "latest").unlink()
    else:
        (tmp_path / "latest").write_text(latest)
    with pytest.warns(CheckpointWarning, match="latest"):
        extra, state = load_fresh(tmp_path)
    assert extra["step"] == 2
    assert_state_equal(states[2], state)


# ---------------------------------------------------------------------- async


@pytest.fixture
def gated_writes(monkeypatch) -> threading.Event:
    """DCP's background writer waits for the returned event before writing any tensor data."""
    release = threading.Event()
    real_write = FileSystemWriter.write_data

    def gated(self, plan, planner):
        assert release.wait(timeout=30), "test never released the writer"
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", gated)
    yield release
    release.set()


def test_async_save_writes_the_state_at_save_time(tmp_path: Path, gated_writes) -> None:
    """Parameters and optimizer state change after save() returns, before anything is written:
    the checkpoint still holds the values of the moment of save()."""
    model, opt = trained()
    expected = full_state(model, opt)
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, app(model, opt), {"step": 1})
    train_step(model, opt, seed=42)  # the next optimizer step, in place
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert_states_differ(expected, full_state(model, opt))
    assert not (tmp_path / "step_00000001").exists()  # finalised only in wait()
    gated_writes.set()
    manager.wait()
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert_state_equal(expected, load_fresh(tmp_path)[1])


def test_async_next_save_finalises_the_previous_one(tmp_path: Path) -> None:
    states = save_steps(tmp_path, [1, 2, 3], async_save=True, keep_last=2)
    assert [p.name for p in CheckpointManager(tmp_path).list_checkpoints()] == [
        "step_00000002",
        "step_00000003",
    ]
    assert_state_equal(states[3], load_fresh(tmp_path)[1])


def test_load_latest_waits_for_a_pending_async_save(tmp_path: Path) -> None:
    model, opt = trained()
    expected = full_state(model, opt)
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(1, app(model, opt), {"step": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert manager.load_latest(app(model, opt))["step"] == 1  # a roll-back uses the new one
    assert_state_equal(expected, full_state(model, opt))


# ---------------------------------------------------------------------- export


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_export_safetensors_round_trip_with_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied().to(torch.bfloat16)
    config = {"d_model": 4, "vocab_size": 10, "tie_embeddings": True}
    path = export_safetensors(model, config, tmp_path / "export")
    assert path == tmp_path / "export" / "model.safetensors"
    state, loaded_config = load_safetensors_export(tmp_path / "export")
    assert loaded_config == config
    torch.manual_seed(1)
    fresh = Tied().to(torch.bfloat16)
    fresh.load_state_dict(state, strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert fresh.head.weight is fresh.embed.weight
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the tied matrix is stored once
        assert sorted(f.keys()) == ["embed.weight", "norm.bias", "norm.weight"]


# ---------------------------------------------------------------------- 2 ranks <-> 1 rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(*args: str) -> None:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(WORKER), *args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True))
    errors = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> dict:
    """One 2-rank launch: load a 1-rank checkpoint into FSDP2, then save an FSDP2 run."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    one_rank_root, two_rank_root, out = tmp / "one", tmp / "two", tmp / "out"
    out.mkdir()
    model, opt = trained(seed=4, steps=2)
    CheckpointManager(one_rank_root).save(6, app(model, opt), {"rank": 0, "data": {"pos": 6}})
    run_two_ranks(str(one_rank_root), str(two_rank_root), str(out), "--async")
    return {"one_rank_state": full_state(model, opt), "two_rank_root": two_rank_root, "out": out}


def test_fsdp2_two_ranks_save_one_rank_load(two_rank_run: dict) -> None:
    root, out = two_rank_run["two_rank_root"], two_rank_run["out"]
    assert [p.name for p in CheckpointManager(root).list_checkpoints()] == ["step_00000002"]
    reference = torch.load(out / "reference.pt", weights_only=True)
    model, opt = build(seed=99)
    assert_states_differ(reference, full_state(model, opt))
    extra = CheckpointManager(root).load_latest(app(model, opt))
    assert_state_equal(reference, full_state(model, opt))
    assert not opt.state.get(model.spare.weight)  # never stepped, so no state saved or loaded
    assert extra["rank"] == 0 and extra["saved_world_size"] == 2
    assert extra["all_ranks"] == [{"consumed": 20}, {"consumed": 21}]


def test_one_rank_save_fsdp2_two_ranks_load(two_rank_run: dict) -> None:
    out = two_rank_run["out"]
    loaded = torch.load(out / "loaded.pt", weights_only=True)
    assert_state_equal(two_rank_run["one_rank_state"], loaded["loaded"])
    assert_state_equal(two_rank_run["one_rank_state"], loaded["reloaded"])
    for rank in range(2):  # rank 1 did not exist at save time: it gets rank 0's extra
        extra = torch.load(out / f"extra_rank{rank}.pt", weights_only=True)
        assert extra["rank"] == 0 and extra["saved_world_size"] == 1
        assert extra["all_ranks"] == [{"pos": 6}]
