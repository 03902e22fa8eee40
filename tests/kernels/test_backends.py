"""Backend selection: availability reasons, ``auto`` resolution, explicit requests, logging."""

from __future__ import annotations

import logging

import pytest

import kernels.backends as kb
import kernels.ssd.op as ssd_op
from kernels.backends import BACKENDS, BackendUnavailableError, backend_problem, select_backends
from pretrain.config import KERNEL_BACKENDS

ALL_AUTO = {op: "auto" for op in BACKENDS}


def pretend_importable(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import_problem`` say that exactly ``modules`` import (others fail with a reason)."""

    def fake(module: str, attr: str | None = None) -> str | None:
        return None if module in modules else f"import {module} failed (pretend)"

    monkeypatch.setattr(kb, "import_problem", fake)

    def no_mamba() -> None:
        raise ModuleNotFoundError("No module named 'mamba_ssm'", name="mamba_ssm")

    if "mamba_ssm" in modules:
        monkeypatch.setattr(ssd_op, "load_mamba_chunk_scan", lambda: object())
    else:
        monkeypatch.setattr(ssd_op, "load_mamba_chunk_scan", no_mamba)


def test_backend_names_match_the_run_config() -> None:
    assert set(BACKENDS) == set(KERNEL_BACKENDS)
    for op, names in BACKENDS.items():
        assert ("auto", *names) == KERNEL_BACKENDS[op]
        assert set(kb.AUTO_ORDER_CUDA[op]) == set(names)
        assert kb.AUTO_ORDER_CUDA[op][-1] == "torch"  # the last resort is always available


def test_torch_is_always_available_and_gpu_backends_need_cuda(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for op in BACKENDS:
        assert backend_problem(op, "torch", "cpu") is None
    for op, backend in [
        ("ssd", "mamba_ssm"),
        ("moe", "megablocks"),
        ("attention", "flex"),
        ("attention", "flash_attn"),
        ("ssd", "triton"),
        ("pkm", "triton"),
    ]:
        problem = backend_problem(op, backend, "cpu")
        assert problem is not None and "CUDA" in problem, (op, backend, problem)
    assert "TRITON_INTERPRET" in backend_problem("ssd", "triton", "cpu")


def test_triton_interpreter_makes_triton_available_on_cpu(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pretend_importable(monkeypatch, "triton", "kernels.ssd.triton", "kernels.pkm.triton")
    assert backend_problem("ssd", "triton", "cpu") is None
    assert backend_problem("pkm", "triton", "cpu") is None
    # ... but auto never picks it on CPU: the interpreter is for tests
    assert select_backends(ALL_AUTO, "cpu") == {op: "torch" for op in BACKENDS}


def test_missing_module_is_named_in_the_reason(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pretend_importable(monkeypatch, "triton")
    problem = backend_problem("ssd", "triton", "cpu")
    assert problem is not None and "kernels.ssd.triton" in problem
    problem = backend_problem("moe", "megablocks", "cuda")
    assert problem is not None and "megablocks.ops" in problem
    problem = backend_problem("ssd", "mamba_ssm", "cuda")
    assert problem is not None and "mamba_ssm" in problem


def test_grouped_mm_availability_follows_torch(monkeypatch) -> None:
    import torch
    import torch.nn.functional as F

    assert backend_problem("moe", "grouped_mm", "cpu") is None  # this torch has it
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    problem = backend_problem("moe", "grouped_mm", "cpu")
    assert problem is not None and "grouped_mm" in problem


def test_auto_on_cpu_is_all_torch() -> None:
    assert select_backends(ALL_AUTO, "cpu") == {op: "torch" for op in BACKENDS}
    assert select_backends({}, "cpu") == {op: "torch" for op in BACKENDS}  # left out = auto


def test_auto_on_cuda_picks_the_best_available(monkeypatch) -> None:
    everything = (
        "triton",
        "kernels.ssd.triton",
        "kernels.pkm.triton",
        "mamba_ssm",
        "megablocks.ops",
        "grouped_gemm",
        "torch.nn.attention.flex_attention",
        "flash_attn",
    )
    pretend_importable(monkeypatch, *everything)
    best = {"ssd": "mamba_ssm", "pkm": "triton", "moe": "megablocks", "attention": "flex"}
    best["boundary_attention"] = "flex"
    assert select_backends(ALL_AUTO, "cuda") == best

    # remove the best one of each op in turn: the next one in the order is picked
    pretend_importable(monkeypatch, "triton", "kernels.ssd.triton", "flash_attn")
    assert select_backends(ALL_AUTO, "cuda") == {
        "ssd": "triton",
        "pkm": "torch",  # kernels.pkm.triton does not import
        "moe": "grouped_mm",  # megablocks does not import; this torch has grouped_mm
        "attention": "flash_attn",
        "boundary_attention": "torch",  # FlexAttention does not import
    }
    pretend_importable(monkeypatch)  # nothing optional imports
    chosen = select_backends(ALL_AUTO, "cuda")
    assert chosen == {
        "ssd": "torch",
        "pkm": "torch",
        "moe": "grouped_mm",
        "attention": "torch",
        "boundary_attention": "torch",
    }


def test_deterministic_mode_skips_autotuning_backends(monkeypatch) -> None:
    pretend_importable(
        monkeypatch, "triton", "kernels.ssd.triton", "mamba_ssm", "megablocks.ops", "grouped_gemm"
    )
    chosen = select_backends(ALL_AUTO, "cuda", deterministic=True)
    assert chosen["ssd"] == "triton" and chosen["moe"] == "grouped_mm"
    with pytest.raises(BackendUnavailableError, match="deterministic"):
        select_backends({"ssd": "mamba_ssm"}, "cuda", deterministic=True)
    assert select_backends({"ssd": "mamba_ssm"}, "cuda")["ssd"] == "mamba_ssm"


def test_explicit_unavailable_backend_raises_with_op_backend_and_reason() -> None:
    with pytest.raises(BackendUnavailableError) as info:
        select_backends({"attention": "flash_attn"}, "cpu")
    err = info.value
    assert (err.op, err.backend) == ("attention", "flash_attn")
    assert "attention" in str(err) and "flash_attn" in str(err) and "CUDA" in str(err)
    # an explicit available backend is kept as asked
    assert select_backends({"moe": "grouped_mm"}, "cpu")["moe"] == "grouped_mm"


def test_unknown_names_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel op"):
        select_backends({"conv": "auto"}, "cpu")
    with pytest.raises(ValueError, match="known"):
        select_backends({"ssd": "cuda_magic"}, "cpu")
    with pytest.raises(ValueError):
        backend_problem("pkm", "flex", "cpu")


def test_choice_is_logged_once_per_op(caplog, monkeypatch) -> None:
    pretend_importable(monkeypatch, "triton", "kernels.ssd.triton")
    with caplog.at_level(logging.INFO, logger="kernels"):
        select_backends({"moe": "torch"}, "cuda")
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert len(lines) == len(BACKENDS)
    for op in BACKENDS:
        assert sum(f"kernel backend for {op}:" in line for line in lines) == 1
    ssd_line = next(line for line in lines if "for ssd:" in line)
    assert "triton" in ssd_line and "mamba_ssm" in ssd_line  # says why mamba_ssm was skipped
    assert any("for moe: torch (requested" in line for line in lines)


def test_auto_prefers_a_traceable_moe_when_compiled() -> None:
    """Under torch.compile, auto takes grouped_mm (no host sync) over the torch loop, on CPU too;
    the other ops are unchanged."""
    assert select_backends({}, "cpu")["moe"] == "torch"
    compiled = select_backends({}, "cpu", compiled=True)
    assert compiled["moe"] == "grouped_mm"
    assert {op: b for op, b in compiled.items() if op != "moe"} == {
        op: "torch" for op in compiled if op != "moe"
    }
    assert select_backends({"moe": "torch"}, "cpu", compiled=True)["moe"] == "torch"  # as asked
