"""``pretrain.allocator``: glibc takes the settings, freed memory then stays in the process, the
switch and the documented GLIBC_TUNABLES equivalent work, and a training run through the real
entry point gives bitwise the same losses with and without it. Each case runs in a fresh process
(malloc settings are process-wide)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.allocator import TUNABLES_EQUIVALENT
from tests.pretrain.trainer_helpers import FAST, TINY, losses

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
    reason="the malloc policy applies to Linux/glibc only",
)

# Applies the policy, then mallocs, touches and frees 64 MiB (above glibc's largest default
# mmap threshold, 32 MiB) and reports how much of it is still resident after the free.
PROBE = """
import ctypes, json, os
from pretrain.allocator import apply_malloc_policy
result = apply_malloc_policy()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
n = 64 * 2**20
block = libc.malloc(n)
ctypes.memset(block, 1, n)
touched = rss_mib()
libc.free(block)
kept = 64 - (touched - rss_mib())
print(json.dumps({"applied": result.applied, "line": result.describe(), "kept_mib": kept}))
"""


def probe(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("HYDRA_MALLOC", "GLIBC_TUNABLES")}
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
        timeout=120,
    )


def probe_result(**env: str) -> dict:
    proc = probe(**env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_retain_is_applied_and_keeps_freed_memory() -> None:
    result = probe_result()
    assert result["applied"], result["line"]
    assert "applied" in result["line"] and "HYDRA_MALLOC=system" in result["line"]
    assert result["kept_mib"] > 56  # the freed block is still resident, ready for reuse


def test_system_switch_leaves_glibc_defaults() -> None:
    result = probe_result(HYDRA_MALLOC="system")
    assert not result["applied"]
    assert "not applied" in result["line"]
    assert result["kept_mib"] < 8  # glibc unmapped it on free


def test_documented_tunables_do_the_same_and_win() -> None:
    """docs/performance.md's GLIBC_TUNABLES line keeps freed memory on its own; the policy then
    leaves the user's settings alone (and says so)."""
    result = probe_result(GLIBC_TUNABLES=TUNABLES_EQUIVALENT)
    assert not result["applied"] and "GLIBC_TUNABLES" in result["line"]
    assert result["kept_mib"] > 56


def test_unknown_policy_is_an_error() -> None:
    proc = probe(HYDRA_MALLOC="jemalloc")
    assert proc.returncode != 0
    assert "HYDRA_MALLOC='jemalloc'" in proc.stderr and "retain, system" in proc.stderr


def test_training_losses_are_bitwise_the_same(tmp_path: Path) -> None:
    """The real entry point (``python -m launch.train``) with the policy and without it."""
    runs = {}
    for policy in ("retain", "system"):
        run_dir = tmp_path / policy
        cmd = [sys.executable, "-m", "launch.train", "--config", TINY, *FAST, f"run.dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_MALLOC": policy}
        env.pop("GLIBC_TUNABLES", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        applied = "applied:" in proc.stderr and "not applied" not in proc.stderr
        assert applied == (policy == "retain"), proc.stderr[-2000:]
        runs[policy] = losses(run_dir)
    assert len(runs["retain"]) == 6
    assert runs["retain"] == runs["system"]
