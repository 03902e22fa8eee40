"""Suite-wide setup (before any test module is imported) and shared fixtures."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it
# (through kernels.backends or a benchmark script): set it before all of them on a CPU machine,
# so every Triton kernel test runs in the interpreter whatever the collection order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops: one intra-op thread avoids oversubscribing a shared 2-core machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Runs of the FAST tiny Hydra (tests/pretrain/trainer_helpers.py) that several test modules
# need in exactly the same form: trained once per session instead of once per module.


@pytest.fixture(scope="session")
def hydra_fast_one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps in one process on the global batch of 4 rows, with the first step's gradients
    and the final parameters dumped: the single-process reference of the parallel tests."""
    from tests.pretrain.trainer_helpers import run_training

    run_dir = tmp_path_factory.mktemp("hydra_fast_one_process")
    env = {"HYDRA_TEST_DUMP_PARAMS": "1", "HYDRA_TEST_DUMP_GRADS": "1"}
    run_training(run_dir, "train.batch_size=4", "train.grad_accum=1", env=env)
    return run_dir


@pytest.fixture(scope="session")
def hydra_fast_stopped_at_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run in one process, stopped after step 3 with a checkpoint: copy it (shutil
    .copytree) before resuming it in another layout."""
    from tests.pretrain.trainer_helpers import run_training

    run_dir = tmp_path_factory.mktemp("hydra_fast_stopped_at_3")
    run_training(run_dir, "train.batch_size=4", "train.grad_accum=1", stop_at=3)
    return run_dir


# Two-rank runs of the same FAST Hydra on the same global batch (2 rows per rank), each trained
# once per session: the parallel tests compare them with one process, the export tests export
# their final checkpoints, the DeepSpeed tests resume against the ZeRO-2 run's losses.
_TWO_RANKS = ("train.batch_size=2",)
_DUMP_PARAMS = {"HYDRA_TEST_DUMP_PARAMS": "1"}  # final_params.safetensors, table_shapes.json


def _two_rank_run(
    tmp_path_factory: pytest.TempPathFactory, name: str, *backend: str, dump: bool = True
) -> Path:
    from tests.pretrain.trainer_helpers import run_training

    run_dir = tmp_path_factory.mktemp(name)
    run_training(run_dir, *_TWO_RANKS, *backend, nproc=2, env=_DUMP_PARAMS if dump else None)
    return run_dir


@pytest.fixture(scope="session")
def hydra_fast_fsdp2_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps on 2 FSDP2 ranks, final parameters dumped; read it, never write into it."""
    return _two_rank_run(tmp_path_factory, "hydra_fast_fsdp2", "parallel.backend=fsdp2")


def _deepspeed_run(tmp_path_factory: pytest.TempPathFactory, stage: str, dump: bool) -> Path:
    config = f"parallel.deepspeed_config=configs/deepspeed/{stage}.json"
    name = f"hydra_fast_{stage}"
    return _two_rank_run(tmp_path_factory, name, "parallel.backend=deepspeed", config, dump=dump)


@pytest.fixture(scope="session")
def hydra_fast_zero2_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 uninterrupted steps on 2 DeepSpeed ZeRO-2 ranks (nothing dumped); read it only."""
    return _deepspeed_run(tmp_path_factory, "zero2", dump=False)


@pytest.fixture(scope="session")
def hydra_fast_zero3_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps on 2 DeepSpeed ZeRO-3 ranks, final parameters dumped; read it only."""
    return _deepspeed_run(tmp_path_factory, "zero3", dump=True)
