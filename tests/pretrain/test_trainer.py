"""The trainer, single process: exact resume, stop signals, non-finite losses, curriculum, MLflow."""

from __future__ import annotations

import importlib.util
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.models.dreamer.stack import drawn_recurrence
from tests.pretrain.trainer_helpers import (
    ATTAMBA_TINY,
    DREAMER_FAST,
    DREAMER_TINY,
    FAST,
    TINY,
    WORKER,
    logged_rows,
    losses,
    run_training,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = (
    "curriculum.stages=[{name: backbone, steps: 2, components: [ssm, ffn]},"
    " {name: attention, steps: 2, components: [ssm, ffn, attention], gate_ramp_steps: 2},"
    " {name: all, lr_factor: 0.5}]"
)


# The Hydra runs of the resume test double as the MLflow tests' runs (one training each, several
# checks): the uninterrupted run reports to an unreachable store, the interrupted and resumed one
# to a SQLite store. Tracking is a side channel, so the losses must still agree bitwise.
UNREACHABLE_MLFLOW = (
    "tracking.enabled=true",
    "tracking.uri=http://127.0.0.1:9",
    "tracking.system_metrics=false",
    "tracking.run_id_wait_s=0",  # no run will ever exist: do not wait for one
)
SQLITE_MLFLOW = (
    "tracking.enabled=true",
    "tracking.system_metrics=false",
    "run.plot=true",
    # on a busy machine a new sqlite store can take longer than the default 10 s to create;
    # the wait ends as soon as the run exists
    "tracking.run_id_wait_s=600",
)


@pytest.fixture(scope="module")
def hydra_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 uninterrupted steps of the tiny Hydra, tracked to a store that refuses connections; the
    tracker's close gives up after 1 s (not the default 15 s) and reports what it never sent."""
    run_dir = tmp_path_factory.mktemp("hydra_full")
    proc = run_training(run_dir, *UNREACHABLE_MLFLOW, env={"HYDRA_TEST_CLOSE_TIMEOUT_S": "1"})
    (run_dir / "output.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.fixture(scope="module")
def hydra_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The same run stopped after step 3 and resumed, tracked in its own SQLite store; with the
    number of steps logged before the resume."""
    tracked = SQLITE_MLFLOW if importlib.util.find_spec("mlflow") else ()
    run_dir = tmp_path_factory.mktemp("hydra_split")
    run_training(run_dir, *tracked, stop_at=3)
    logged_before_resume = len(losses(run_dir))
    run_training(run_dir, *tracked)
    return run_dir, logged_before_resume


@pytest.mark.parametrize("config", [TINY, ATTAMBA_TINY], ids=["hydra", "attamba"])
def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(
    tmp_path: Path, config: str, request: pytest.FixtureRequest
) -> None:
    if config == TINY:
        full = request.getfixturevalue("hydra_full")
        split, logged_before_resume = request.getfixturevalue("hydra_split")
    else:
        full, split = tmp_path / "full", tmp_path / "split"
        run_training(full, config=config)
        run_training(split, stop_at=3, config=config)
        logged_before_resume = len(losses(split))
        run_training(split, config=config)
    assert logged_before_resume == 3
    assert losses(split) == losses(full)  # bitwise, not approx
    assert len(losses(full)) == 6


# A depth drawn per step in [2, 4] after a 2-step stage at depth 1, over 2 micro-batches
DREAMER_RUN = (
    *DREAMER_FAST,
    "model.dreamer.train_recurrence=[2,4]",
    "curriculum.stages=[{name: shallow, steps: 2, recurrence: 1}, {name: drawn}]",
    "train.grad_accum=2",
)


def test_dreamer_resume_with_a_depth_drawn_per_step_is_exact(tmp_path: Path) -> None:
    run_training(tmp_path / "full", *DREAMER_RUN, config=DREAMER_TINY)
    run_training(tmp_path / "split", *DREAMER_RUN, stop_at=3, config=DREAMER_TINY)
    run_training(tmp_path / "split", *DREAMER_RUN, config=DREAMER_TINY)
    assert losses(tmp_path / "split") == losses(tmp_path / "full")  # bitwise
    assert len(losses(tmp_path / "full")) == 6
    rows = [row for row in logged_rows(tmp_path / "full") if "loss" in row]
    assert [row["stage"] for row in rows] == [0, 0, 1, 1, 1, 1]
    drawn = [drawn_recurrence(step, 2, 4) for step in range(2, 6)]
    assert [row["recurrence"] for row in rows] == [1, 1, *drawn]
    assert set(drawn) - {1, 3}, drawn  # the draws differ from the stage's and the eval depth


@pytest.fixture(scope="module")
def stages_without_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The staged run with checkpoints disabled (even with every=2): the uninterrupted reference
    of the curriculum resume test too, since checkpointing must not change the losses."""
    run_dir = tmp_path_factory.mktemp("stages")
    run_training(run_dir, STAGES, "checkpoint.enabled=false", "checkpoint.every=2")
    return run_dir


def test_checkpoints_disabled_writes_none(stages_without_checkpoints: Path) -> None:
    assert len(losses(stages_without_checkpoints)) == 6
    assert not list((stages_without_checkpoints / "checkpoints").glob("step_*"))


def test_curriculum_stages_switch_at_configured_steps_and_survive_resume(
    tmp_path: Path, stages_without_checkpoints: Path
) -> None:
    full = stages_without_checkpoints
    stages = [row["stage"] for row in logged_rows(full) if "loss" in row]
    assert stages == [0, 0, 1, 1, 2, 2]
    split = ("checkpoint.keep_last=10",)  # (checkpoint.every=0: only stage changes, stop, end)
    run_training(tmp_path / "split", STAGES, *split, stop_at=3)  # stop inside stage 1
    run_training(tmp_path / "split", STAGES, *split)
    assert losses(tmp_path / "split") == losses(full)
    saved = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step_*"))
    # stage changes are checkpointed: step 2 before the stop at 3, step 4 after the resume
    assert {"step_00000002", "step_00000004"} <= set(saved)


def test_stage_components_are_really_switched(tmp_path: Path) -> None:
    from pretrain.config import load_config
    from pretrain.curriculum import apply_stage, resolve_stages
    from pretrain.models import build_model

    cfg = load_config(TINY, [*FAST, STAGES])
    model = build_model(cfg.model)
    stages = resolve_stages(cfg.curriculum, cfg.train.steps, cfg.train.seq_len, 4)
    apply_stage(model, stages, 0)
    assert all(
        not b.active.get("attention", False) and not b.active.get("pkm", False)
        for b in model.blocks.values()
    )
    apply_stage(model, stages, 2)  # first step of stage 1: attention ramps in at 1/2
    ramps = [b.ramp["attention"] for b in model.blocks.values() if "attention" in b.ramp]
    assert ramps and all(r == pytest.approx(0.5) for r in ramps)
    apply_stage(model, stages, 5)
    assert all(all(b.active.values()) for b in model.blocks.values())


def test_bad_curriculum_is_a_clear_error(tmp_path: Path) -> None:
    from pretrain.config import ConfigError, load_config
    from pretrain.curriculum import resolve_stages

    cfg = load_config(TINY, [*FAST, "curriculum.stages=[{name: a, steps: 5}, {name: b, steps: 5}]"])
    with pytest.raises(ConfigError, match=r"stages\[b\].*beyond train.steps=6"):
        resolve_stages(cfg.curriculum, cfg.train.steps, cfg.train.seq_len, 4)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(TINY, ["curriculum.stages=[{name: a, components: [attn]}]"])


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(WORKER),
        TINY,
        "0",
        *FAST,
        "train.steps=100000",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len(logged_rows(run_dir)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGTERM)" in out
    last = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert last == f"step_{len(losses(run_dir)):08d}"


def test_nonfinite_loss_skips_the_step_then_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    original = Trainer._forward_backward
    poisoned_steps = {4, 5}  # each poisoned once: after the rollback they train normally

    def poisoned(self, micro):
        loss, aux, tokens = original(self, micro)
        step = self.state.step + 1
        if step in poisoned_steps:
            poisoned_steps.discard(step)
            return math.nan, aux, tokens
        return loss, aux, tokens

    monkeypatch.setattr(Trainer, "_forward_backward", poisoned)
    messages: list[str] = []
    cfg = load_config(
        TINY,
        [
            *FAST,
            "train.steps=8",
            "train.max_nonfinite=2",
            "checkpoint.every=2",
            f"run.dir={tmp_path}",
        ],
    )
    trainer = build_trainer(cfg, DistInfo(), log=messages.append)
    history = trainer.run()
    skipped = [row["step"] for row in history if row.get("skipped")]
    assert skipped[:2] == [4, 5]
    assert any("rolled back to step 4" in m for m in messages)
    assert trainer.state.step == 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_routing_bias_moves_once_per_step_and_not_on_skipped_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config
    from pretrain.metrics import moe_layers
    from pretrain.trainer import Trainer

    original_fb, original_hook = Trainer._forward_backward, Trainer._after_optimizer_step

    def poisoned(self, micro):
        loss, aux, tokens = original_fb(self, micro)
        return (math.nan if self.state.step + 1 == 3 else loss), aux, tokens

    calls: list[tuple[bool, bool]] = []  # (stepped, bias moved)

    def recorded(self, stepped: bool) -> None:
        (moe,) = moe_layers(self.model).values()
        before = moe.expert_bias.clone()
        original_hook(self, stepped)
        calls.append((stepped, not torch.equal(before, moe.expert_bias)))

    monkeypatch.setattr(Trainer, "_forward_backward", poisoned)
    monkeypatch.setattr(Trainer, "_after_optimizer_step", recorded)
    overrides = [*FAST, "train.steps=4", "train.grad_accum=2", "train.max_nonfinite=5"]
    cfg = load_config(TINY, [*overrides, "checkpoint.enabled=false", f"run.dir={tmp_path}"])
    build_trainer(cfg, DistInfo(), log=lambda m: None).run()
    # one call per optimizer step (not per micro-batch); the skipped step 3 leaves the bias
    assert calls == [(True, True), (True, True), (False, False), (True, True)]


def test_persistent_nonfinite_loss_stops_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config
    from pretrain.trainer import RollbackImpossible, Trainer

    original = Trainer._forward_backward

    def always_nan_after_2(self, micro):
        loss, aux, tokens = original(self, micro)
        return (math.nan if self.state.step >= 2 else loss), aux, tokens

    monkeypatch.setattr(Trainer, "_forward_backward", always_nan_after_2)
    cfg = load_config(
        TINY, [*FAST, "train.max_nonfinite=2", "checkpoint.every=2", f"run.dir={tmp_path}"]
    )
    with pytest.raises(RollbackImpossible, match="non-finite"):
        build_trainer(cfg, DistInfo(), log=lambda m: None).run()


def test_unreachable_mlflow_does_not_stop_training(hydra_full: Path) -> None:
    assert len(losses(hydra_full)) == 6
    assert "MLflow unsent at close" in (hydra_full / "output.txt").read_text()


def test_mlflow_run_continues_after_resume_without_duplicate_steps(
    hydra_split: tuple[Path, int],
) -> None:
    mlflow = pytest.importorskip("mlflow")
    tmp_path, _ = hydra_split  # stopped after step 3, then resumed
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == losses(tmp_path)
    # The resolved config and the training curves (of all 6 steps) are artifacts of that run.
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(runs[0].info.run_id, "plots")}
    assert {"config.yaml", "plots/training.png"} <= artifacts
    assert (tmp_path / "plots" / "training.png").stat().st_size > 10_000
