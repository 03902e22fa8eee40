"""A rank that stops answering (SIGSTOP; here a rank that blocks forever) makes the others fail within ``parallel.timeout_s``,
with a message naming this rank, the phase and step, and where the silent rank was; the exit is
non-zero (so a launcher restarts), and ``exit_status.json`` says failed and retryable."""

from __future__ import annotations

from pathlib import Path

from pretrain.exit_status import read_exit_status
from tests.reliability.torchrun import torchrun


def test_a_stopped_rank_is_named(tmp_path: Path) -> None:
    proc = torchrun(
        tmp_path,
        "parallel.timeout_s=5",
        fault="1:3:HANG",  # rank 1 stops answering after its step 3
        max_restarts=0,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "CollectiveFailure: rank 0: a collective in 'stop check' at step 3 failed" in out, out[
        -5000:
    ]
    assert "parallel.timeout_s=5 s" in out
    assert "rank 1 at step 4 in" not in out and "rank 1 at step 3 in" in out, out[-5000:]
    status = read_exit_status(tmp_path)
    assert status["status"] == "failed" and status["retryable"] is True, status
    assert "rank 1 at step 3" in status["error"]


def test_only_collective_failures_count_as_lost_peers() -> None:
    from parallel.progress import is_peer_failure

    gloo = "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms"
    assert is_peer_failure(RuntimeError(gloo))
    assert is_peer_failure(RuntimeError("Gloo connectFullMesh failed: Connection refused"))
    assert not is_peer_failure(RuntimeError("DataLoader timed out after 5 seconds"))
    assert not is_peer_failure(ValueError("gloo timed out"))  # not an error gloo raises
