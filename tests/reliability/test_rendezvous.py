"""The per-start key space of ``parallel/rendezvous.py`` against a real TCPStore, in threads."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from parallel.rendezvous import RendezvousTimeout, generation_store
from tests.pretrain.trainer_helpers import free_port


@pytest.fixture
def agent_store(monkeypatch: pytest.MonkeyPatch) -> dist.TCPStore:
    """A store like torchrun's agent keeps for all attempts (the ranks connect as clients)."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return store


def _start_ranks(ranks: list[int], world: int, results: dict) -> list[threading.Thread]:
    def run(rank: int) -> None:
        try:
            results[rank] = generation_store(rank, world, timeout_s=60)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "rendezvous did not return"


def test_a_restart_never_joins_the_dead_attempt(agent_store: dist.TCPStore) -> None:
    first: dict = {}
    _join(_start_ranks([0, 1, 2], 3, first))  # attempt 1 completes, then "dies"
    assert all(isinstance(s, dist.PrefixStore) for s in first.values()), first
    # attempt 2: ranks 1 and 2 start before rank 0 and find attempt 1's generation and answers
    second: dict = {}
    old_nonce = agent_store.get("hydra_pretrain/gen1/join/1")
    early = _start_ranks([1, 2], 3, second)
    deadline = time.monotonic() + 60
    while agent_store.get("hydra_pretrain/gen1/join/1") == old_nonce:  # rank 1 joined gen 1
        assert time.monotonic() < deadline, "rank 1 never tried the old generation"
        time.sleep(0.01)
    _join(early + _start_ranks([0], 3, second))
    assert all(isinstance(s, dist.PrefixStore) for s in second.values()), second
    second[0].set("hello", "attempt 2")  # one key space for the three ranks...
    assert second[1].get("hello") == second[2].get("hello") == b"attempt 2"
    assert not first[1].check(["hello"])  # ...and not the dead attempt's


def test_a_missing_rank_fails_naming_it(agent_store: dist.TCPStore) -> None:
    with pytest.raises(RendezvousTimeout, match=r"ranks \[1\] did not join"):
        generation_store(0, 2, timeout_s=1)
