"""The command line: params (table and JSON), train, config errors as exit code 2; its
conventions (--version, plain help with defaults, one train entry for every launcher, logging with
a rank filter, eval progress and MLflow through the tracker)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from launch.cli import HelpFormatter, build_parser, main
from launch.logging_setup import ALL_RANKS_ENV, CONSOLE_LOGGER, configure_logging
from launch.package_check import check_own_packages
from tests.pretrain.model_helpers import CONFIG_DIR
from tests.pretrain.trainer_helpers import FAST, free_port, logged_rows

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = str(CONFIG_DIR / "hydra-tiny.yaml")


def test_params_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--config", TINY, "--json"]) == 0
    account = json.loads(capsys.readouterr().out)
    assert account["total_params"] >= account["active_params"] > 0
    assert sum(c["total"] for c in account["components"].values()) == account["total_params"]


def test_params_json_has_the_inference_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--config", TINY, "--json", "train.seq_len=128"]) == 0
    caches = json.loads(capsys.readouterr().out)["inference_cache"]
    assert set(caches) == {"128", "8192", "65536"}
    for cache in caches.values():
        assert cache["total"] == sum(v for k, v in cache.items() if k != "total") > 0
        assert cache["pkm"] == 0  # a per-token map keeps no decode state
        assert cache["moe"] == 2 * 4 * 4  # chunk routing: the unit's fp32 router logits


def test_params_table_prints_the_inference_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--config", str(CONFIG_DIR / "transformer-29m.yaml")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("inference cache")]
    assert [ln.split(" tokens")[0] for ln in lines] == [
        f"inference cache at {n}" for n in (1024, 8192, 65536)
    ]
    # full attention: the same bytes per token at every context
    assert len({ln.split(", ")[1] for ln in lines}) == 1


def test_params_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--config", str(CONFIG_DIR / "hydra-1.6b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "TOTAL" in out and "pkm" in out and "moe" in out
    # 16 B per parameter over dp_shard=8 ranks
    assert "per rank (fsdp2 over dp_shard=8 x cp=1 = 8 shards): params+grads+AdamW 3.22 GB" in out


def test_params_of_the_million_row_table_per_rank(capsys: pytest.CaptureFixture[str]) -> None:
    config = str(CONFIG_DIR / "hydra-1.6b-pkm1m.yaml")
    assert main(["params", "--config", config]) == 0
    out = capsys.readouterr().out
    # 1024^2 rows x 2048 = 2.147B table parameters, 16 B each, split over the 8 FSDP ranks
    assert "PKM value tables: 2.147B params, split by columns over 8 ranks" in out
    assert "4.29 GB of params+grads+AdamW per rank (34.36 GB whole)" in out
    assert main(["params", "--config", config, "parallel.pkm_shard=none"]) == 0
    assert "in FSDP: each forward all-gathers all 8.59 GB (fp32)" in capsys.readouterr().out


def test_train_runs_and_loss_goes_down(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    overrides = [
        # the command, not the model, is under test: the 2-block variant with every component
        # and short rows (FAST's model and batch) trains the same 30 steps in a fraction of the time
        "model.n_layers=2",
        "model.workspace.after_blocks=[1]",
        "model.pkm.after_blocks=[0]",
        "train.batch_size=4",
        "train.seq_len=64",
        "train.steps=30",
        "train.log_every=5",
        "curriculum.stages=[]",
        f"run.dir={tmp_path}",
        "tracking.enabled=false",
    ]
    assert main(["train", "--config", TINY, *overrides]) == 0
    losses = [
        float(line.split("loss ")[1].split()[0])
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("step")
    ]
    assert len(losses) >= 3 and losses[-1] < losses[0]


def test_config_error_is_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["params", "--config", TINY, "model.no_such_key=1"]) == 2
    assert "model.no_such_key" in capsys.readouterr().err


def test_own_packages_are_not_shadowed() -> None:
    check_own_packages()


# ---------------------------------------------------------------- command-line conventions


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"hydra-pretrain {metadata.version('hydra-pretrain')}\n"


def test_help_is_plain_text_and_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    texts = {"": parser.format_help()}
    texts.update({name: sub.format_help() for name, sub in _subparsers(parser).items()})
    assert {"params", "train", "prepare", "eval"} <= set(texts)
    for name, text in texts.items():
        assert "``" not in text and ":func:" not in text, (name, text)
    assert "torchrun --nproc_per_node 2 $(which hydra-pretrain) train" in texts[""]
    assert "rows per batch (default: 8)" in " ".join(texts["eval"].split())
    assert "tokens per training sequence (default: 2048)" in " ".join(texts["prepare"].split())
    # the description's line breaks are kept
    assert "\n  hydra-pretrain train --config configs/hydra-tiny.yaml" in texts[""]
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--mlflow-timeout SECONDS" in capsys.readouterr().out


HIDDEN = {"local_rank"}  # deepspeed's --local_rank: accepted, not shown


def test_every_option_of_every_command_has_help_and_shows_its_default() -> None:
    parser = build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        assert issubclass(sub.formatter_class, HelpFormatter), name
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"hydra-pretrain {name} {action.option_strings or action.dest}"
            if action.help == argparse.SUPPRESS:
                assert action.dest in HIDDEN, where
                continue
            assert action.help and action.help.strip(), f"{where}: no help text"
            shown = formatter._expand_help(action)  # what --help prints (fails on a bad %)
            optional = action.option_strings and not action.required
            if optional and not isinstance(action, argparse._VersionAction):
                assert "default" in shown, f"{where}: its default is not shown: {shown!r}"


def test_deepspeed_local_rank_and_the_launch_train_alias(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from launch.train import main as train_alias

    bad = ["--config", TINY, "model.no_such_key=1"]
    # deepspeed puts --local_rank=N right after the script: before the subcommand, or (for
    # launch/train.py) before the train flags; both reach the same config check
    assert main(["--local_rank=0", "train", *bad]) == 2
    assert "model.no_such_key" in capsys.readouterr().err
    assert train_alias(["--local_rank=1", *bad]) == 2
    assert "model.no_such_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_alias(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: hydra-pretrain train") and "--log-all-ranks" in text


@pytest.mark.usefixtures("fresh_logging")
def test_a_launched_rank_ends_through_run_and_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under a launcher (WORLD_SIZE > 1) the command line's ``main()`` leaves through
    ``parallel.dist.run_and_exit`` (os._exit after a process group); called with arguments, as
    a function, it returns its code."""
    import parallel.dist

    codes = []

    def run_and_exit(entry):  # noqa: ANN001, ANN202
        codes.append(entry())
        raise SystemExit(codes[-1])

    monkeypatch.setattr(parallel.dist, "run_and_exit", run_and_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["params", "--config", TINY, "--json"]
    monkeypatch.setattr(sys, "argv", ["hydra-pretrain", *argv])
    with pytest.raises(SystemExit):
        main()
    assert codes == [0] and json.loads(capsys.readouterr().out)["total_params"] > 0
    assert main(argv) == 0 and codes == [0]


# ---------------------------------------------------------------- logging and the rank filter


@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No launcher variables; our handlers removed again afterwards."""
    for name in ("RANK", "WORLD_SIZE", ALL_RANKS_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    for logger in (logging.getLogger(), logging.getLogger(CONSOLE_LOGGER)):
        for handler in [h for h in logger.handlers if h.get_name() == "hydra-pretrain"]:
            logger.removeHandler(handler)
    logging.getLogger(CONSOLE_LOGGER).propagate = True


def _log_three(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    logging.getLogger(CONSOLE_LOGGER).info("step      1 | loss 5.0")
    logging.getLogger("pretrain").info("device mesh: dp=2")
    logging.getLogger("pretrain").warning("shard 3 skipped")
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.mark.usefixtures("fresh_logging")
def test_rank_filter(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    configure_logging()
    out, err = _log_three(capsys)
    assert out == "step      1 | loss 5.0\n"  # rank 0: as print wrote it
    assert "pretrain: device mesh: dp=2" in err and "pretrain: shard 3 skipped" in err
    assert "[rank" not in out + err

    monkeypatch.setenv("RANK", "1")
    configure_logging()  # replaces the handlers of the call before
    out, err = _log_three(capsys)
    assert out == "" and "device mesh" not in err  # rank 1: hidden by default...
    assert err.count("\n") == 1 and err.startswith("[rank 1] ") and "shard 3 skipped" in err

    for configure in (lambda: configure_logging(all_ranks=True), configure_logging):
        monkeypatch.setenv(ALL_RANKS_ENV, "1")  # ... shown with the flag or the variable
        configure()
        out, err = _log_three(capsys)
        assert out == "[rank 1] step      1 | loss 5.0\n"
        assert [line.split(" ")[:2] for line in err.splitlines()] == [["[rank", "1]"]] * 2
        monkeypatch.delenv(ALL_RANKS_ENV)


def _torchrun(entry: list[str], run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *entry, "train", "--config", TINY, *FAST, "train.steps=3", "train.batch_size=2",
        "parallel.backend=ddp", "checkpoint.every=3", f"run.dir={run_dir}", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ALL_RANKS_ENV, None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _step_lines(text: str) -> list[str]:
    """The trainer's per-step lines (after a ``[rank N]`` mark, if any)."""
    return [line for line in text.splitlines() if line.split("] ", 1)[-1].startswith("step ")]


@pytest.mark.parametrize("log_all_ranks", [False, True])
def test_train_under_torchrun_with_the_one_entry_point(tmp_path: Path, log_all_ranks: bool) -> None:
    """``torchrun hydra-pretrain train`` (the console script) and ``torchrun -m launch.cli
    train``: 2 gloo ranks train, exit 0 through ``run_and_exit``; only rank 0 logs unless asked."""
    script = Path(sys.executable).with_name("hydra-pretrain")
    if log_all_ranks:
        proc = _torchrun(["-m", "launch.cli"], tmp_path, "--log-all-ranks")
    else:
        assert script.is_file(), "the console script is installed with the package"
        proc = _torchrun([str(script)], tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, f"{out[-3000:]}\n{proc.stderr[-5000:]}"
    assert [row["step"] for row in logged_rows(tmp_path) if "loss" in row] == [1, 2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    steps = _step_lines(out)
    if log_all_ranks:
        for rank in (0, 1):
            mine = [line for line in steps if line.startswith(f"[rank {rank}] step ")]
            assert len(mine) == 3, out
        assert "[rank 1] checkpoint saved at step 3" in out
    else:
        assert [line.split("|")[0].split() for line in steps] == [
            ["step", str(s)] for s in (1, 2, 3)
        ]
        assert "checkpoint saved at step 3" in out and "[rank 1] " not in out + proc.stderr


# ---------------------------------------------------------------- eval: progress, MLflow


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny run tracked in its own SQLite store, with a checkpoint at step 2."""
    from launch.train import make_tracker
    from parallel.dist import DistInfo
    from pretrain.build import build_trainer
    from pretrain.config import load_config

    run = tmp_path_factory.mktemp("tracked") / "run"
    overrides = [*FAST, "train.steps=2", "checkpoint.every=2", f"run.dir={run}"]
    overrides += ["tracking.enabled=true", "tracking.system_metrics=false"]
    cfg = load_config(TINY, overrides)
    build_trainer(cfg, DistInfo(), tracker_factory=make_tracker, log=lambda m: None).run()
    return run


def test_eval_shows_progress_and_logs_to_mlflow_through_the_tracker(
    tracked_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    import launch.tracking
    from launch.evaluation import log_to_mlflow

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hydra-pretrain").experiment_id])
    run_id = run.info.run_id
    client.update_run(run_id, status="RUNNING")  # as if its training were still going
    built = []
    real = launch.tracking.build_tracker

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch.tracking, "build_tracker", spy)
    argv = ["eval", "--run", str(tracked_run), "--tasks", "fact_lookup,chaining_h2"]
    assert main([*argv, "--batches", "1", "--batch-size", "2", "--mlflow"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "eval: 100%" in captured.err and "2/2" in captured.err  # the bar, on stderr
    assert report["mlflow"] == {
        "logged": True,
        "run_id": run_id,
        "tracking_uri": f"sqlite:///{tracked_run.resolve() / 'mlflow.db'}",
    }
    assert len(built) == 1 and built[0]["attach"] is True and built[0]["run_id"] == run_id
    history = client.get_metric_history(run_id, "eval/fact_lookup/loss")
    assert [(m.step, m.value) for m in history] == [(2, report["tasks"]["fact_lookup"]["loss"])]
    assert client.get_run(run_id).info.status == "RUNNING"  # only added to
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments)) == 1  # no second run

    # an id the store does not hold: reported, and no run is created for it
    uri = report["mlflow"]["tracking_uri"]
    status = log_to_mlflow({"eval/x/loss": 1.0}, "0" * 32, uri, step=2, run_dir=tracked_run)
    assert status["logged"] is False and "is not in the store" in status["reason"], status
    assert len(client.search_runs(experiments)) == 1
