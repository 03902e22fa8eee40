"""Bad input, all of it: a rejected config exits 2 with one line naming the key or path and what
is allowed, before anything is written (issue 16, part 7).

The operator drill's cases run through ``launch.train.train_main`` (in process) and, for a few,
through the real command line in a subprocess; a property-based test throws random dotted
overrides at ``load_config`` + ``preflight``: a config or a ``ConfigError``, never another
exception.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipeline.prepare import PrepareConfig, prepare_dataset
from data_pipeline.synthetic import TASKS
from launch.cli import main as cli_main
from launch.train import train_main
from pretrain.config import ConfigError, RunConfig, load_config
from pretrain.preflight import preflight

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "hydra-tiny.yaml"
# a valid two-step run of the tiny model, if nothing else were wrong
SHORT = ["train.steps=2", "curriculum.stages=[]", "checkpoint.every=0"]
OLD_CONFIG = "old: the existing run's config\n"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset (byte tokenizer: 272 ids) of 256-token windows, with a val split."""
    src = tmp_path_factory.mktemp("text") / "docs.txt"
    src.write_text("".join(f"document {i}: " + "lorem ipsum " * 30 + "\n" for i in range(40)))
    out = tmp_path_factory.mktemp("shards") / "bytes"
    prepare_dataset(
        PrepareConfig(
            inputs=[str(src)], output=str(out), text_unit="line", seq_len=256, val_docs=4,
            progress=False,
        )
    )  # fmt: skip
    return out


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An existing run directory (config.yaml, metrics) that a rejected run must leave as it is;
    the working directory is ``tmp_path`` so that no stray MLflow store goes unnoticed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OLD_CONFIG)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    before = sorted(p.name for p in run.iterdir())
    yield run
    assert sorted(p.name for p in run.iterdir()) == before  # no mlflow.db, checkpoints, plots
    assert (run / "config.yaml").read_text() == OLD_CONFIG
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def _bad_cases(tmp: Path, shards: Path) -> dict[str, tuple[list[str], str]]:
    """Case -> (overrides of the tiny config, after ``SHORT``; text the one error line must
    contain). The files they name are in ``tmp`` (``_write_bad_files``)."""
    ds = "parallel.backend=deepspeed"
    return {
        "deepspeed_json_missing": (
            [ds, f"parallel.deepspeed_config={tmp}/nope.json"],
            f"parallel.deepspeed_config={tmp}/nope.json: no such file",
        ),
        "deepspeed_json_invalid": (
            [ds, f"parallel.deepspeed_config={tmp}/bad.json"],
            "bad.json: not valid JSON",
        ),
        "deepspeed_json_owned_key": (
            [ds, f"parallel.deepspeed_config={tmp}/owned.json"],
            "remove ['train_batch_size']",
        ),
        "unknown_task": (["data.sources=[{task: nosuch}]"], "data.sources[0].task: unknown task"),
        "unknown_task_arg": (
            ["data.sources=[{task: chaining, task_args: {nosuch: 1}}]"],
            "'data.sources[0].task_args.nosuch'; allowed keys of task chaining: ['hops',",
        ),
        "missing_shards": (
            [f"data.sources=[{{path: {tmp}/nope}}]"],
            f"data.sources[0].path={tmp}/nope: no such directory",
        ),
        "vocab_below_shards": (
            [f"data.sources=[{{path: {shards}}}]"],
            "model.vocab_size=128 is smaller than the vocabulary of data.sources[0]",
        ),
        "run_dir_is_a_file": ([f"run.dir={tmp}/a_file"], f"run.dir={tmp}/a_file is not a dir"),
        "unknown_uri_scheme": (["tracking.uri=foo://bar"], "tracking.uri='foo://bar': unsupported"),
        # a stage longer than SHORT's two steps: placed on the world size, by preflight
        "curriculum_beyond_steps": (
            ["curriculum.stages=" + json.dumps(TINY_STAGES)],
            "curriculum.stages[backbone]: ends at step 20, beyond train.steps=2",
        ),
    }


def _write_bad_files(tmp: Path) -> None:
    (tmp / "bad.json").write_text('{"zero_optimization": {"stage": 2')
    (tmp / "owned.json").write_text('{"train_batch_size": 16}')
    (tmp / "a_file").write_text("not a directory")


TINY_STAGES = [{"name": "backbone", "steps": 20}, {"name": "rest"}]
CASES = list(_bad_cases(Path("tmp"), Path("shards")))


@pytest.mark.parametrize("case", CASES)
def test_drill_case_exits_2_with_one_line_and_writes_nothing(
    case: str, old_run: Path, byte_shards: Path, capsys: pytest.CaptureFixture
) -> None:
    _write_bad_files(old_run.parent)
    overrides, expected = _bad_cases(old_run.parent, byte_shards)[case]
    assert train_main(str(TINY), [*SHORT, f"run.dir={old_run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("config error: ") and expected in err, err


@NO_CUDA
def test_cuda_device_on_a_cpu_machine(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert train_main(str(TINY), [*SHORT, f"run.dir={old_run}", "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device=cuda: no CUDA device" in err, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_unwritable_run_dir_is_found_by_trying(old_run: Path) -> None:
    """Permission bits cannot tell (this may run as root): procfs refuses any new file."""
    cfg = load_config(TINY, [*SHORT, "run.dir=/proc/hydra-run"])
    with pytest.raises(ConfigError, match=r"run\.dir=/proc/hydra-run: cannot create files there"):
        preflight(cfg)


def test_preflight_accepts_what_can_run(old_run: Path, byte_shards: Path) -> None:
    """The same checks pass a config that fits: shards at their vocabulary and seq_len (with
    the val split evaluation reads), a local tracking store, an existing run directory."""
    shards = [f"data.sources=[{{path: {byte_shards}}}]", "model.vocab_size=272"]
    extra = ["train.eval_every=1", "tracking.uri=sqlite:///store/mlflow.db", "kernels.ssd=torch"]
    preflight(load_config(TINY, [*SHORT, f"run.dir={old_run}", *shards, *extra]))
    with pytest.raises(ConfigError, match=r"seq_len=256 but read at seq_len \[128\]"):
        preflight(load_config(TINY, [*SHORT, *shards, "train.seq_len=128"]))
    with pytest.raises(ConfigError, match=r"data\.eval_split=test: .* it has \['train', 'val'\]"):
        preflight(
            load_config(TINY, [*SHORT, *shards, "train.eval_every=1", "data.eval_split=test"])
        )


def _run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@NO_CUDA
def test_command_line_rejects_with_exit_2_one_line_no_traceback(old_run: Path) -> None:
    """The real entry points, in subprocesses: ``hydra-pretrain train`` with an empty YAML,
    ``launch.train`` with a Triton kernel on a CPU machine (no interpreter) and with a missing
    DeepSpeed JSON."""
    tmp = old_run.parent
    (tmp / "empty.yaml").write_text("# nothing but a comment\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    run_dir = f"run.dir={old_run}"
    cases = [
        (["-m", "launch.cli", "train", "--config", "empty.yaml", run_dir], "empty.yaml is empty"),
        (
            ["-m", "launch.train", "--config", str(TINY), *SHORT, run_dir, "kernels.ssd=triton"],
            "kernels.ssd=triton: needs a CUDA device",
        ),
        (
            [
                "-m",
                "launch.train",
                "--config",
                str(TINY),
                *SHORT,
                run_dir,
                "parallel.backend=deepspeed",
                "parallel.deepspeed_config=missing.json",
            ],
            "parallel.deepspeed_config=missing.json: no such file",
        ),  # fmt: skip
    ]
    for args, expected in cases:
        done = _run_cli(args, tmp, env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("config error: ") and expected in done.stderr, done.stderr


def test_prepare_refuses_a_field_no_record_has(tmp_path: Path, capsys) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    args = ["prepare", str(src), "--output", str(out), "--seq-len", "8", "--no-progress"]
    assert cli_main([*args, "--field", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--field 'nosuch': no JSONL record has it" in err and "['body', 'id']" in err, err
    assert not out.exists()  # refused before the output directory is made
    assert cli_main([*args, "--field", "body"]) == 0


# --------------------------------------------------------------------- random overrides


def _leaves(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Dotted key -> field type of every leaf of the config tree."""
    hints = typing.get_type_hints(cls)
    leaves = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves |= _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = hints[f.name]
    return leaves


LEAVES = _leaves(RunConfig)
KNOWN_KEYS = sorted(LEAVES)
SECTIONS = sorted({k.split(".")[0] for k in KNOWN_KEYS} | {"model.ssm", "model.moe"})
# values that reach deeper checks than random text does
WORDS = [
    "auto", "torch", "triton", "mamba_ssm", "flex", "cpu", "cuda", "none", "ddp", "fsdp2",
    "deepspeed", "chaining", "nosuch", "foo://bar", "sqlite:///x.db", "file:///nonexistent/x",
    "http://127.0.0.1:9", "missing.json", "", "0", "-1", "1e-3", ".inf", ".nan", "~", "null",
    "[1, 2]", "{a: 1}", "[", "{", "!!python/object:os.system", "a: b: c",
]  # fmt: skip
# mostly printable ASCII (more of it parses as YAML), some of all Unicode; never "/": no path
# outside the working directory
TEXT = st.text(
    st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="/"), max_size=12
)
TEXT |= st.text(st.characters(exclude_characters="/"), max_size=6)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(), st.floats(), TEXT,
    st.sampled_from(WORDS),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=6,
)
RAW = st.one_of(VALUES.map(json.dumps), TEXT, st.sampled_from(WORDS))
KEY_TEXT = st.text(st.characters(exclude_characters="=/"), max_size=8)
TASK_FIELDS = sorted({f for cls in TASKS.values() for f in cls.__dataclass_fields__} | {"nosuch"})


def _of_type(tp: typing.Any) -> st.SearchStrategy:
    """Values of roughly the field's type (edge cases included), so that many examples pass
    the type checks and reach the cross-field checks and ``preflight``."""
    args = typing.get_args(tp)
    if type(None) in args:
        return st.none() | _of_type(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is list and args[0] in (int, float, str):
        return st.lists(_of_type(args[0]), max_size=3)
    simple = {
        bool: st.booleans(),
        int: st.integers(-2, 600),
        float: st.floats(-1.0, 10.0) | st.sampled_from([0.0, 1e-3, float("inf")]),
        str: st.sampled_from([*WORDS, "ssm", "ffn", "attention", "moe", "pkm"]),
    }
    return simple.get(tp, VALUES)


def _source(task: str, args: dict) -> str:
    return "data.sources=" + json.dumps([{"task": task, "task_args": args}])


TYPED = st.sampled_from(KNOWN_KEYS).flatmap(  # a known key, a value of about its type
    lambda key: _of_type(LEAVES[key]).map(lambda v: f"{key}={json.dumps(v)}")
)
OVERRIDE = st.one_of(
    TYPED,
    TYPED,  # three of eight branches: more examples reach preflight
    TYPED,
    st.builds("{}={}".format, st.sampled_from(KNOWN_KEYS), RAW),  # a known key, any value
    st.builds("{}.{}={}".format, st.sampled_from(SECTIONS), KEY_TEXT, RAW),  # unknown leaf
    st.builds("{}={}".format, KEY_TEXT, RAW),  # anything at the top
    st.builds(
        _source,
        st.sampled_from([*TASKS, "nosuch"]),
        st.dictionaries(st.sampled_from(TASK_FIELDS), SCALARS | VALUES, max_size=3),
    ),
    st.builds("curriculum.stages={}".format, VALUES.map(json.dumps)),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory for relative paths (run dirs, stores) the random overrides name."""
    path = tmp_path_factory.mktemp("random-overrides")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("WORLD_SIZE", raising=False)
        yield path


@settings(
    max_examples=200,
    derandomize=True,  # the same examples on every run: a failure is reproducible
    database=None,  # nothing to replay: the examples are fixed
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    overrides=st.lists(OVERRIDE, min_size=1, max_size=3),
    shard_source=st.booleans(),
)
def test_random_overrides_give_a_config_or_one_config_error(
    overrides: list[str], shard_source: bool, workdir: Path, byte_shards: Path
) -> None:
    shards = [f"data.sources=[{{path: {byte_shards}}}]", "model.vocab_size=272"]
    base = ["run.dir=run", *(shards if shard_source else [])]
    try:
        preflight(load_config(None, [*base, *overrides]))
    except ConfigError as err:
        message = str(err)
        assert message.strip() and "\n" not in message, repr(message)
