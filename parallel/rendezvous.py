"""A fresh key space in the launcher's store for each start of the ranks.

torchrun's agent keeps one TCPStore for its whole life and hands it to every attempt
(``TORCHELASTIC_USE_AGENT_STORE=True``, static and c10d rendezvous alike). Gloo publishes each
rank's listening address under fixed keys, so after ``--max-restarts`` relaunches the ranks, a
fast rank reads the *dead* attempt's addresses and fails with "connectFullMesh ... Connection
refused", or waits out the timeout in the process-group constructor (pytorch#167288).

``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt on several nodes: an agent whose workers
are restarted because another node re-joined does not count a restart, so the counts can differ
between nodes. Instead, global rank 0 opens a new *generation* (an atomic counter in the store)
and every other rank joins the newest one with a nonce of its own, which rank 0 answers. A rank
that read a generation whose rank 0 is dead gets no answer and reads the counter again, so the
answer cannot come from an earlier attempt, and every rank ends up under the same prefix.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
import uuid

import torch.distributed as dist

logger = logging.getLogger("parallel")

_PREFIX = "hydra_pretrain"
_GENERATION = f"{_PREFIX}/generation"
_RETRY_S = 5.0  # a non-zero rank re-reads the generation this often until rank 0 answers


class RendezvousTimeout(RuntimeError):
    """The ranks did not meet within the process group's timeout."""


def uses_agent_store() -> bool:
    """Whether the launcher (torchrun) shares its own long-lived store with the ranks."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def generation_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """The agent's store under a prefix that is new for this start of the ranks.

    Collective over every rank of the job; fails with ``RendezvousTimeout`` (naming the missing
    ranks) when they do not all arrive within ``timeout_s``.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if rank == 0:
        generation = _open_generation(store, world_size, timeout_s)
    else:
        generation = _join_generation(store, rank, timeout_s)
    logger.info("rank %d: process group generation %d", rank, generation)
    return dist.PrefixStore(f"{_PREFIX}/gen{generation}/", store)


def _open_generation(store: dist.Store, world_size: int, timeout_s: float) -> int:
    generation = int(store.add(_GENERATION, 1))
    deadline = time.monotonic() + timeout_s
    missing = list(range(1, world_size))
    while missing:
        left = _time_left(
            deadline,
            f"rank 0: ranks {missing} did not join process group generation {generation} within"
            f" parallel.timeout_s={timeout_s:g} s (crashed or stopped before init?)",
        )
        key = _join_key(generation, missing[0])
        try:
            store.wait([key], datetime.timedelta(seconds=min(left, _RETRY_S)))
        except dist.DistStoreError:  # not there yet: check the deadline and wait again
            continue
        nonce = store.get(key)
        store.set(_welcome_key(generation, missing[0]), nonce)
        missing.pop(0)
    return generation


def _join_generation(store: dist.Store, rank: int, timeout_s: float) -> int:
    nonce = uuid.uuid4().hex.encode()
    deadline = time.monotonic() + timeout_s
    while True:
        left = _time_left(
            deadline,
            f"rank {rank}: rank 0 did not open a process group generation within"
            f" parallel.timeout_s={timeout_s:g} s",
        )
        generation = int(store.add(_GENERATION, 0))
        if generation == 0:  # rank 0 has not started yet
            time.sleep(min(0.1, left))
            continue
        store.set(_join_key(generation, rank), nonce)
        welcome = _welcome_key(generation, rank)
        try:
            store.wait([welcome], datetime.timedelta(seconds=min(left, _RETRY_S)))
        except dist.DistStoreError:  # a dead attempt's generation, or rank 0 is slow: re-read
            continue
        if store.get(welcome) == nonce:
            return generation
        time.sleep(min(0.1, left))  # a dead attempt's answer to its own rank: rank 0 is not up


def _time_left(deadline: float, problem: str) -> float:
    """Seconds until ``deadline``; past it, ``RendezvousTimeout(problem)``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise RendezvousTimeout(problem)
    return left


def _join_key(generation: int, rank: int) -> str:
    return f"{_PREFIX}/gen{generation}/join/{rank}"


def _welcome_key(generation: int, rank: int) -> str:
    return f"{_PREFIX}/gen{generation}/welcome/{rank}"
