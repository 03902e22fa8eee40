"""DeepSpeed engine checkpoints are as safe as the DCP ones: 2 gloo ranks, ZeRO-2, under torchrun.

One run trains 6 steps uninterrupted (the reference losses: tests/conftest.py's, which writes no
checkpoint before the end). Another saves at steps 2 and 4 and dies while publishing step 6
(manifest written, rename not done). Each case copies that run directory, damages it, resumes it
to step 6 and compares the losses with the reference: a resume from the right checkpoint on
*both* ranks gives the same losses, bitwise (any rank resuming from another step or state would
not). Every resume forbids ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import files, verify
from pretrain.checkpoint.state import load_extra
from tests.pretrain.trainer_helpers import losses, run_training

WORKER = Path(__file__).with_name("deepspeed_worker.py")
ZERO2 = (
    "parallel.backend=deepspeed",
    "parallel.deepspeed_config=configs/deepspeed/zero2.json",
    "train.batch_size=2",
    "checkpoint.every=2",
    "parallel.timeout_s=120",  # a rank left waiting fails the test in minutes, not 10
)
SAFE = {"HYDRA_TEST_FORBID_UNSAFE_LOADS": "1"}
RANK1_OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _train(run_dir: Path, env: dict | None = None) -> str:
    proc = run_training(run_dir, *ZERO2, nproc=2, env={**SAFE, **(env or {})}, worker=WORKER)
    return proc.stdout + proc.stderr


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / files.step_dir_name(step)


def _resumed_from(output: str) -> dict[int, int]:
    """{rank: the checkpoint step it loaded}."""
    return {int(r): int(s) for r, s in re.findall(r"rank (\d+) loaded step (\d+)", output)}


@pytest.fixture(scope="module")
def reference(hydra_fast_zero2_two_ranks: Path) -> list[float]:
    """The uninterrupted run's losses: tests/conftest.py's ZeRO-2 run on the same global batch
    (shared with the parallel tests; it writes no checkpoint before the end, and checkpoints
    must not change the losses)."""
    return losses(hydra_fast_zero2_two_ranks)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints 2 and 4, and the leftover of a crash while publishing 6."""
    run_dir = tmp_path_factory.mktemp("crashed")
    with pytest.raises(AssertionError, match="training failed"):
        _train(run_dir, env={"HYDRA_TEST_CRASH_PUBLISHING": "6"})
    return run_dir


def _copy(crashed: Path, to: Path) -> Path:
    shutil.copytree(crashed, to)
    return to


def _flip_words(path: Path, count: int = 1024) -> None:
    """Invert ``count`` fp32-sized words in the middle of ``path`` (its size stays)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    end = min(start + 4 * count, len(data))
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_crash_while_publishing_leaves_a_tmp_dir_that_is_never_loaded(
    crashed: Path, reference: list[float], tmp_path: Path
) -> None:
    root = crashed / "checkpoints"
    leftover = root / f"{files.TMP_PREFIX}{files.step_dir_name(6)}"
    assert (leftover / files.MANIFEST).is_file()  # complete but for the rename
    assert [p.name for p in files.step_dirs(root)] == ["step_00000002", "step_00000004"]
    assert files.read_latest(root) == "step_00000004"

    run_dir = _copy(crashed, tmp_path / "run")
    output = _train(run_dir)
    assert _resumed_from(output) == {0: 4, 1: 4}
    assert losses(run_dir) == reference
    root = run_dir / "checkpoints"
    assert not list(root.glob(f"{files.TMP_PREFIX}*"))
    assert files.read_latest(root) == "step_00000006"


def test_one_ranks_damaged_shard_sends_both_ranks_back_to_the_same_step(
    crashed: Path, reference: list[float], tmp_path: Path
) -> None:
    """Rank 1's optimizer partition truncated (the drill) and 1024 fp32 words flipped in the model
    states (same size: only sha256 can tell): both are named, both ranks resume from step 2."""
    run_dir = _copy(crashed, tmp_path / "run")
    _truncate(_ckpt(run_dir, 4) / RANK1_OPTIM)
    _flip_words(_ckpt(run_dir, 4) / MODEL)
    output = _train(run_dir)
    skipped = re.search(r"checkpoint \S*step_00000004 is unusable and was skipped: (.*)", output)
    assert skipped, output[-3000:]
    assert f"{RANK1_OPTIM} has" in skipped.group(1) and "truncated" in skipped.group(1)
    assert f"{MODEL} does not match its sha256" in skipped.group(1)
    assert _resumed_from(output) == {0: 2, 1: 2}
    assert losses(run_dir) == reference


def test_an_engine_load_failure_on_one_rank_is_agreed(
    crashed: Path, reference: list[float], tmp_path: Path
) -> None:
    """A shard that matches its manifest but that DeepSpeed cannot read on rank 1 only (as if it
    was damaged before it was hashed): rank 0 loads step 4 fine, yet both fall back to step 2."""
    run_dir = _copy(crashed, tmp_path / "run")
    ckpt = _ckpt(run_dir, 4)
    _truncate(ckpt / RANK1_OPTIM)
    manifest = json.loads((ckpt / files.MANIFEST).read_text())
    manifest["files"][RANK1_OPTIM] = files.file_record(ckpt / RANK1_OPTIM)
    (ckpt / files.MANIFEST).write_text(json.dumps(manifest))
    output = _train(run_dir)
    skipped = re.search(r"checkpoint \S*step_00000004 is unusable and was skipped: (.*)", output)
    assert skipped, output[-3000:]
    assert skipped.group(1).startswith("rank 1: loading the tensors failed")
    assert _resumed_from(output) == {0: 2, 1: 2}
    assert losses(run_dir) == reference


def test_no_usable_checkpoint_is_an_error_naming_each(crashed: Path, tmp_path: Path) -> None:
    """Step 4 corrupt, step 2 without its manifest (as a DeepSpeed checkpoint from before
    manifests would be): refused, never a silent fresh start."""
    run_dir = _copy(crashed, tmp_path / "run")
    _flip_words(_ckpt(run_dir, 4) / MODEL, count=1)
    (_ckpt(run_dir, 2) / files.MANIFEST).unlink()
    with pytest.raises(AssertionError) as failed:
        _train(run_dir)
    message = str(failed.value)
    assert "none can be loaded" in message
    assert f"step_00000004 ({MODEL} does not match its sha256" in message
    assert "step_00000002 (manifest.json is missing" in message
    assert not _ckpt(run_dir, 6).exists()


def test_every_file_loads_with_weights_only(crashed: Path) -> None:
    """Our extra state with plain ``weights_only=True``; DeepSpeed's own files with it too,
    given the few DeepSpeed classes it pickles (``WeightsOnlyCheckpointIO``)."""
    from parallel.deepspeed import deepspeed_safe_globals

    ckpt = _ckpt(crashed, 4)
    for rank in range(2):
        extra = load_extra(ckpt / files.extra_name(rank))  # weights_only=True
        assert extra["train_state"]["step"] == 4
    assert len(load_extra(ckpt / files.DATA_STATES)) == 2
    engine_files = sorted(
        p for p in ckpt.glob("*.pt") if "rank" in p.name and "extra" not in p.name
    )
    assert engine_files
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for path in engine_files + [ckpt / MODEL]:
            torch.load(path, weights_only=True)


def test_a_deepspeed_checkpoint_is_not_taken_for_a_dcp_one(crashed: Path) -> None:
    """The manifest names its engine: a switch of parallel.backend is a clear skip reason."""
    ckpt = _ckpt(crashed, 4)
    assert verify.read_checked_manifest(ckpt, files.ENGINE_DEEPSPEED) == (
        None,
        files.read_manifest(ckpt),
    )
    problem, _ = verify.read_checked_manifest(ckpt)  # what the DCP manager asks
    assert problem == (
        "it holds deepspeed engine state and this run loads dcp checkpoints"
        " (parallel.backend changed?)"
    )
