"""``hydra-pretrain eval``: JSON report of a trained checkpoint, checkpoint choice, error paths."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from data_pipeline.prepare import PrepareConfig, prepare_dataset
from launch.cli import main
from launch.evaluation import log_to_mlflow
from parallel.dist import DistInfo
from pretrain.build import build_trainer
from pretrain.config import load_config
from pretrain.eval import EVAL_TASKS
from pretrain.eval.routing import document_labels, mutual_information_bits
from tests.pretrain.trainer_helpers import FAST, TINY

# 272 = the byte tokenizer's vocabulary, so the prepared shard set below fits the model
TRAIN = [*FAST, "train.steps=4", "checkpoint.every=2", "model.vocab_size=272"]
QUICK = ["--batches", "1", "--batch-size", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step tiny run with checkpoints at steps 2 and 4 (trained once for the module)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    torch.set_num_threads(1)
    cfg = load_config(TINY, [*TRAIN, f"run.dir={run}"])
    build_trainer(cfg, DistInfo(), log=lambda message: None).run()
    return run


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-tokenised dataset of 64-token rows with a val split."""
    src = tmp_path_factory.mktemp("text") / "docs.txt"
    src.write_text("\n".join(f"document {i}: " + "abc def " * (i % 7 + 3) for i in range(80)))
    out = src.parent / "shards"
    prepare_dataset(
        PrepareConfig(
            inputs=[str(src)], output=str(out), text_unit="line", seq_len=64,
            samples_per_shard=8, val_fraction=0.3, progress=False,
        )
    )  # fmt: skip
    return out


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    """(exit code, the JSON on stdout or None, stderr) of ``hydra-pretrain eval argv``."""
    code = main(["eval", *argv])
    captured = capsys.readouterr()
    report = json.loads(captured.out) if code == 0 else None
    return code, report, captured.err


def test_report_of_every_task_and_held_out_shards(
    run_dir: Path, shard_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.json"
    code, report, err = _eval(capsys, "--run", str(run_dir), *QUICK, "--data", str(shard_set),
                              "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert report == json.loads(out.read_text())
    assert report["step"] == 4 and report["checkpoint"].endswith("step_00000004")
    assert report["family"] == "hydra" and report["params"] > 0
    assert report["seq_len"] == 64 and report["heldout_seed"] == 1_000_003
    assert set(report["tasks"]) == set(EVAL_TASKS) and report["skipped_tasks"] == {}
    for name, row in report["tasks"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["answers"] > 0, name
        assert math.isfinite(row["loss"]) and row["perplexity"] >= 1.0, name
    assert report["tasks"]["chaining_h5"]["task_args"] == {"hops": [5], "n_symbols": 32}
    routing = report["tasks"]["domain_mixture"]
    assert 0.0 <= routing["expert_mi_bits"] <= routing["label_entropy_bits"] + 1e-9
    data = report["data"]
    assert data["split"] == "val" and data["tokens"] > 0 and math.isfinite(data["loss"])


def test_step_and_checkpoint_directory(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, by_step, err = _eval(capsys, "--run", str(run_dir), "--step", "2", "--tasks",
                               "fact_lookup", *QUICK)  # fmt: skip
    assert code == 0, err
    assert by_step["step"] == 2 and list(by_step["tasks"]) == ["fact_lookup"]
    step_dir = run_dir / "checkpoints" / "step_00000002"
    code, by_dir, err = _eval(capsys, "--run", str(step_dir), "--tasks", "fact_lookup", *QUICK)
    assert code == 0, err
    assert by_dir["tasks"] == by_step["tasks"]  # same weights, same held-out rows


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = next((run / "checkpoints" / "step_00000004").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-7])  # truncated
    with pytest.warns(UserWarning, match="step_00000004"):
        code, report, err = _eval(capsys, "--run", str(run), "--tasks", "none", *QUICK)
    assert code == 0, err
    assert report["step"] == 2 and report["tasks"] == {}
    code, _, err = _eval(capsys, "--run", str(run), "--step", "4", "--tasks", "none")
    assert code == 2 and data.name in err and "truncated" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tasks", "chaining_h9"], "chaining_h9"),
        (["--step", "3"], "available steps: [2, 4]"),
        (["--seq-len", "16", "--tasks", "chaining_h5"], "chaining_h5"),
        (["--data", "/nonexistent/shards"], "/nonexistent/shards"),
    ],
)
def test_bad_input_is_exit_code_2(
    run_dir: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _eval(capsys, "--run", str(run_dir), *argv)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_missing_run_is_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _eval(capsys, "--run", str(tmp_path / "nope"))
    assert code == 2 and str(tmp_path / "nope") in err
    code, _, err = _eval(capsys, "--run", str(tmp_path))  # exists, holds no checkpoint
    assert code == 2 and "no checkpoints" in err


def test_mlflow_without_a_tracked_run_warns_and_still_reports(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, err = _eval(capsys, "--run", str(run_dir), "--tasks", "none", "--mlflow")
    assert code == 0
    assert report["mlflow"]["logged"] is False and "no MLflow run id" in err


def test_unreachable_mlflow_store_is_reported_not_raised() -> None:
    status = log_to_mlflow(
        {"eval/x/loss": 1.0}, "0123abcd", "http://127.0.0.1:9", step=4, timeout_s=2
    )
    assert status["logged"] is False and status["reason"]


def test_mutual_information_of_routing_tables() -> None:
    assert mutual_information_bits(torch.tensor([[5, 0], [0, 5]])) == pytest.approx((1.0, 1.0))
    mi, h = mutual_information_bits(torch.tensor([[3, 3], [3, 3]]))
    assert mi == pytest.approx(0.0) and h == pytest.approx(1.0)
    group = torch.tensor([[-1, 2, -1, -1, 0, -1]])
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert document_labels(group, seq_idx).tolist() == [[2, 2, 2, 0, 0, -1]]
