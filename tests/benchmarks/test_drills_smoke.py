"""``benchmarks/drills.py --quick``: one trial each of the cheap drills (SIGTERM to a training
process at a random moment, a damaged checkpoint, a damaged shard), through real processes and
real signals; the table, the JSON and the Markdown, and every trial passed. Then the drill's own
checks are shown to fail on a damaged checkpoint and a changed loss (they are not vacuous)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark

bench = load_benchmark("drills.py")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("drills")
    out = tmp / "drills.json"
    report = bench.main(["--quick", "--seed", "7", "--out", str(out), "--work-dir", str(tmp / "w")])
    return report, out


def test_quick_drills_pass_and_report(
    quick: tuple[dict, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report, out = quick
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["seed"] == "7" and report["settings"]["trials"] == 1
    rows = report["table"]
    assert [r["drill"] for r in rows] == list(bench.QUICK)
    for row in rows:
        assert (row["trials"], row["passed"], row["failed"]) == (1, 1, 0), row["notes"]
        assert row["notes"]  # the outcome of the trial is named
    trials = report["trials"]
    assert [t["drill"] for t in trials] == list(bench.QUICK)
    for trial in trials:
        assert trial["passed"] and not trial["problems"], trial
        assert trial["seed"] == f"7-{trial['drill']}-0" and trial["outcome"]
    assert trials[0]["params"]["moment"]["phase"] == trials[0]["params"]["phase"]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| drill | trials | passed | failed | notes |")
    assert "| sigterm | 1 | 1 | 0 |" in table


def test_choices_repeat_with_the_seed_and_cover_every_option(tmp_path: Path) -> None:
    ref = bench.Reference(Path("."), [], first_step_s=3.0, step_s=0.1, close_s=0.5)

    def moment(seed: str, index: int) -> dict:
        trial = bench.Trial("sigterm", index, seed, tmp_path)
        return bench.draw_moment(trial.rng, ref, trial.pick("phase", bench.PHASES))

    assert moment("7", 0) == moment("7", 0) != moment("8", 0)
    assert {moment("7", i)["phase"] for i in range(4)} == set(bench.PHASES)  # 4 trials: all
    assert [moment("7", i)["phase"] for i in range(4)].count("training") == 2
    for i in range(8):
        drawn = moment("7", i)
        if drawn["phase"] == "startup":
            assert 0 <= drawn["after_s"] <= 3.0
        else:
            assert 1 <= drawn["after_step"] <= bench.STEPS and 0 <= drawn["delay_s"] <= 0.5


def test_checks_fail_on_a_damaged_checkpoint_and_a_changed_loss(
    quick: tuple[dict, Path], tmp_path: Path
) -> None:
    reference_dir = Path(quick[0]["settings"]["work_dir"]) / "reference-single"
    ref = bench.Reference(reference_dir, bench.logged_steps(reference_dir)[1], 1.0, 0.1, 0.1)
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir, run_dir)
    trial = bench.Trial("check", 0, "7", tmp_path)
    bench.check_finished(trial, 0, "", run_dir, ref)
    assert trial.problems == []  # the reference run itself passes

    newest = bench.files.step_dirs(run_dir / "checkpoints")[-1]
    bench.damage_file(random.Random(0), newest / "extra_rank0.pt", "flip")
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    row = json.loads(rows[4])
    row["loss"] = ref.losses[4] + 1e-12
    rows[4] = json.dumps(row)
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    bench.check_finished(trial, 0, "", run_dir, ref)
    assert any("loss at step 5" in p for p in trial.problems), trial.problems
    assert any(f"{newest.name}: extra_rank0.pt does not match" in p for p in trial.problems)
