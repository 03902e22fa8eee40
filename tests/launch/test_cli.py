"""The command line: params (table and JSON), train, config errors as exit code 2."""

from __future__ import annotations

import json

import pytest

from launch.cli import main
from launch.package_check import check_own_packages
from tests.pretrain.model_helpers import CONFIG_DIR

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
        assert cache["moe"] == cache["pkm"] == 0  # per-token maps keep no decode state


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
