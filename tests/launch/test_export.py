"""``hydra-pretrain export`` and ``load_pretrained``: round trips from every checkpoint format the
trainer writes, the shipped tokenizer, and the command's errors.

Three runs are trained once for the module: one process on BPE-tokenised shards (DCP,
checkpoints at steps 2, 4, 6), 2 gloo ranks under FSDP2 (DCP) and 2 ranks under DeepSpeed ZeRO-3
(engine checkpoints, partitioned model states) on synthetic tasks. Each exports through the CLI;
the exported model's logits must equal, bitwise (fp32, tolerance 0), those of the model that
``hydra-pretrain eval`` loads from the checkpoint, and its weights must equal the weights the
trainer held when it finished (an independent reference: it checks the DeepSpeed merge too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.tokenizer import load_tokenizer
from launch.cli import main
from parallel.dist import DistInfo
from pretrain import load_pretrained
from pretrain.build import build_trainer
from pretrain.checkpoint import files
from pretrain.checkpoint.export import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    exported_tokenizer,
    load_safetensors_export,
    pretrained_config,
    write_export,
)
from pretrain.config import load_config
from pretrain.eval import load_checkpoint_model
from pretrain.models import build_model
from tests.pretrain.trainer_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

BPE_VOCAB = 300  # 16 special ids + 256 bytes + 28 merges
TEXT = "the quick brown fox jumps over the lazy dog"


def _export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    """(exit code, the JSON summary or None, stderr) of ``hydra-pretrain export ARGV``."""
    code = main(["export", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def _error(err: str) -> str:
    """The command's error: exactly one line of stderr (the rest is progress and logging)."""
    lines = [line for line in err.splitlines() if line.startswith("export error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    src.write_text("\n".join(f"{TEXT} {i} and the dog sleeps {i * 7}" for i in range(300)))
    out = tmp_path_factory.mktemp("shards") / "bpe"
    prepare_dataset(
        PrepareConfig(
            inputs=[str(src)], output=str(out), text_unit="line", train_bpe=BPE_VOCAB,
            seq_len=64, samples_per_shard=16, progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory: pytest.TempPathFactory, bpe_shards: Path) -> tuple[Path, dict]:
    """(run dir, the trainer's final weights) of one process on BPE shards, saving every 2 steps."""
    run = tmp_path_factory.mktemp("dcp") / "run"
    overrides = [
        *FAST,
        f"run.dir={run}",
        f"model.vocab_size={BPE_VOCAB}",
        f"data.sources=[{{path: {bpe_shards}}}]",
        "checkpoint.every=2",
    ]
    torch.set_num_threads(1)
    trainer = build_trainer(load_config(TINY, overrides), DistInfo(), log=lambda message: None)
    trainer.run()
    return run, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# The two-rank runs are tests/conftest.py's (shared with the parallel tests): FAST with 2 rows
# per rank, the worker dumping final_params.safetensors.
def _two_rank_run(run: Path) -> tuple[Path, dict]:
    return run, load_file(run / "final_params.safetensors")


@pytest.fixture(scope="module")
def fsdp2_run(hydra_fast_fsdp2_two_ranks: Path) -> tuple[Path, dict]:
    return _two_rank_run(hydra_fast_fsdp2_two_ranks)


@pytest.fixture(scope="module")
def zero3_run(hydra_fast_zero3_two_ranks: Path) -> tuple[Path, dict]:
    return _two_rank_run(hydra_fast_zero3_two_ranks)


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def _forbid_unsafe_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any ``torch.load(weights_only=False)`` from here on raises (DeepSpeed's reader asks)."""
    original = torch.load

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("weights_only") is False:
            raise AssertionError(f"torch.load(weights_only=False) of {args[:1]}")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


@pytest.mark.parametrize(
    ("run_fixture", "engine", "world"),
    [("dcp_run", "dcp", 1), ("fsdp2_run", "dcp", 2), ("zero3_run", "deepspeed", 2)],
    ids=["dcp", "fsdp2", "zero3"],
)
def test_exported_model_equals_the_checkpoint(
    run_fixture: str,
    engine: str,
    world: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    run, final_weights = request.getfixturevalue(run_fixture)
    _forbid_unsafe_loads(monkeypatch)
    out = tmp_path / "export"
    code, summary, err = _export(capsys, "--run", str(run), "--out", str(out))
    assert code == 0, err
    assert (summary["step"], summary["engine"], summary["world_size"]) == (6, engine, world)
    exported = load_pretrained(out)
    reference = load_checkpoint_model(run).model
    vocab = reference.cfg.vocab_size
    assert torch.equal(_logits(exported, vocab), _logits(reference, vocab))  # tolerance 0
    state = exported.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for name, tensor in final_weights.items():  # the dump leaves out the MoE balancing bias
        assert torch.equal(state[name], tensor), name
    assert all(t.dtype == torch.float32 for t in state.values())


def test_the_runs_bpe_tokenizer_ships_with_the_export(
    dcp_run: tuple[Path, dict], bpe_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    code, summary, err = _export(capsys, "--run", str(dcp_run[0]), "--out", str(out))
    assert code == 0 and summary["tokenizer"] == "bpe", err
    original = load_tokenizer(bpe_shards)
    info = json.loads((out / CONFIG).read_text())["tokenizer"]
    assert info["file"] == TOKENIZER and info["sha256"] == original.describe()["sha256"]
    shipped = exported_tokenizer(out)
    ids = shipped.encode(TEXT)
    assert ids == original.encode(TEXT) and len(ids) < len(TEXT)  # merges, not bytes
    assert shipped.decode(ids) == TEXT


def test_a_synthetic_run_exports_an_ids_vocabulary(
    fsdp2_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    assert _export(capsys, "--run", str(fsdp2_run[0]), "--out", str(out))[0] == 0
    assert json.loads((out / CONFIG).read_text())["tokenizer"] == {"kind": "ids", "vocab_size": 128}
    assert exported_tokenizer(out) is None and not (out / TOKENIZER).exists()
    out = tmp_path / "byte"  # a tokenizer named on the command line: 272 ids, the model has 128
    args = ("--run", str(fsdp2_run[0]), "--out", str(out), "--tokenizer", "byte")
    code, _, err = _export(capsys, *args)
    assert code == 2 and "272 ids, more than the model's model.vocab_size=128" in _error(err)


def test_step_choice_and_a_corrupt_checkpoint(
    dcp_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = shutil.copytree(dcp_run[0], tmp_path / "run")
    code, summary, err = _export(
        capsys, "--run", str(run), "--step", "4", "--out", str(tmp_path / "a")
    )
    assert code == 0 and summary["step"] == 4, err
    step6 = run / "checkpoints" / files.step_dir_name(6)
    shard = next(step6.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    shard.write_bytes(bytes(data))

    code, _, err = _export(capsys, "--run", str(run), "--step", "6", "--out", str(tmp_path / "b"))
    assert code == 2 and f"{shard.name} does not match its sha256" in _error(err), err
    assert not (tmp_path / "b").exists()  # nothing written for a bad checkpoint

    with pytest.warns(UserWarning, match="step_00000006 skipped"):  # the newest that verifies
        code, summary, err = _export(capsys, "--run", str(run), "--out", str(tmp_path / "c"))
    assert code == 0 and summary["step"] == 4, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--run", "/nonexistent/run"], "checkpoint path /nonexistent/run does not exist"),
        (["--step", "5"], "no checkpoint of step 5 in"),
        (["--tokenizer", "/nonexistent/tok.json"], "--tokenizer: tokenizer not found"),
    ],
    ids=["missing-run", "missing-step", "missing-tokenizer"],
)
def test_errors_are_one_line_and_exit_2(
    dcp_run: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    argv: list[str],
    message: str,
) -> None:
    argv = argv if argv[0] == "--run" else ["--run", str(dcp_run[0]), *argv]
    code, _, err = _export(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2 and message in _error(err), err


def test_a_non_empty_out_needs_force(
    dcp_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / TOKENIZER).write_text("{}")  # left by an export that shipped one
    code, _, err = _export(
        capsys, "--run", str(dcp_run[0]), "--out", str(out), "--tokenizer", "ids"
    )
    assert code == 2 and "is not empty; pass --force" in _error(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", TOKENIZER]
    args = ("--run", str(dcp_run[0]), "--out", str(out), "--tokenizer", "ids", "--force")
    assert _export(capsys, *args)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS, "notes.txt"]  # stale one gone


def test_paths_and_gate_ramps_of_the_exported_step_come_back(tmp_path: Path) -> None:
    """A run stopped mid-curriculum: paths off and a path being phased in change the logits."""
    cfg = load_config(TINY, FAST)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    model.set_active_paths({"ssm", "attention", "moe"})
    model.blocks["1"].ramp["moe"] = 0.25
    write_export(model, pretrained_config(model, {"kind": "ids", "vocab_size": 128}, {}), tmp_path)
    loaded = load_pretrained(tmp_path)
    assert [b.active for b in loaded.blocks.values()] == [b.active for b in model.blocks.values()]
    assert loaded.blocks["1"].ramp["moe"] == 0.25 and not loaded.training
    assert torch.equal(_logits(loaded, 128), _logits(model, 128))
    model.set_active_paths({"ssm", "attention", "moe", "ffn", "workspace", "pkm"})
    model.blocks["1"].ramp["moe"] = 1.0
    assert not torch.equal(_logits(loaded, 128), _logits(model, 128))  # the settings mattered


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_old_alias_exports_still_read(tmp_path: Path) -> None:
    model = Tied()
    write_export(model, {}, tmp_path / "new")
    assert list(load_file(tmp_path / "new" / WEIGHTS)) == ["embed.weight"]
    state, _ = load_safetensors_export(tmp_path / "new")  # save_model's {dropped: kept}
    assert state["head.weight"] is state["embed.weight"]

    old = tmp_path / "old"  # written before save_model: an alias map under "tied_weights"
    old.mkdir()
    weights = {"embed.weight": model.embed.weight.detach().clone()}
    meta = {"format": "pt", "tied_weights": json.dumps({"head.weight": "embed.weight"})}
    save_file(weights, str(old / WEIGHTS), metadata=meta)
    (old / CONFIG).write_text("{}")
    state, _ = load_safetensors_export(old)
    fresh = Tied()
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.head.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight
