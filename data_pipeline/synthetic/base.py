"""Shared machinery of the synthetic tasks: problems, row packing, the resumable stream, checking.

A *problem* is one document: its tokens end with EOS and some of its tokens are *answers* (the
tokens a model is scored on). Problems are packed whole into rows of ``seq_len`` tokens; the rest
of a row is PAD with label -100. Row ``i`` is a pure function of ``(task, seed, i)``: each row has
its own RNG, so any row can be regenerated on its own, which makes resuming, splitting over
data-parallel ranks and DataLoader workers, and re-splitting on another world size exact and cheap.

Shapes: T = seq_len. A sample is a dict of
  input_ids [T] int64, labels [T] int64 (next token inside the same document, else -100),
  answer_mask [T] bool (True where ``labels[t]`` is an answer token), seq_idx [T] int64
  (document index inside the row; the padded tail is a document of its own).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import DataConfigError
from data_pipeline.tokens import EOS_ID, IGNORE_INDEX, NUM_SPECIAL, PAD_ID


@dataclass
class Problem:
    """One generated problem (a document).

    Attributes:
        tokens: the document's token ids, ending with EOS.
        answers: indices into ``tokens`` of the answer tokens (each >= 1: it has a prefix).
        group: a task-specific category for per-group accuracy (e.g. the number of hops).
    """

    tokens: list[int]
    answers: list[int]
    group: int = 0


@dataclass
class SyntheticTask:
    """Base class of a task: generates problems and, independently, solves them from tokens.

    Subclasses set ``name``, implement ``sample``, ``solve_next`` and ``max_len`` and call
    ``_check_vocab`` from ``__post_init__``.
    """

    vocab_size: int
    n_symbols: int = 64  # distinct ordinary symbols the task uses (ids NUM_SPECIAL ...)
    name: str = field(default="task", init=False)

    def __post_init__(self) -> None:
        self._check_vocab()

    def _check_vocab(self) -> None:
        if self.n_symbols < 1:
            raise DataConfigError(f"{self.name}.n_symbols: must be >= 1, got {self.n_symbols}")
        need = NUM_SPECIAL + self.n_symbols
        if self.vocab_size < need:
            raise DataConfigError(
                f"{self.name}: vocab_size={self.vocab_size} is too small: the task needs"
                f" {NUM_SPECIAL} special ids + n_symbols={self.n_symbols} symbols = {need}"
            )

    def symbol(self, k: int) -> int:
        """Token id of the k-th symbol."""
        return NUM_SPECIAL + k

    def max_len(self, seq_len: int) -> int:
        """Upper bound on a problem's length in tokens (rows of ``seq_len`` must hold one)."""
        raise NotImplementedError

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        """Generate one problem with ``rng`` (at most ``max_len(seq_len)`` tokens)."""
        raise NotImplementedError

    def solve_next(self, prefix: list[int]) -> int:
        """The answer token that follows ``prefix`` (a document up to, excluding, an answer).

        Parses the tokens on its own, without the generator's choices, so tests can check that
        every generated answer is right.
        """
        raise NotImplementedError


def _row_rng(task_name: str, seed: int, row: int) -> random.Random:
    # One independent stream per (task, seed, row); int seeding is stable across processes.
    salt = zlib.crc32(task_name.encode())
    return random.Random((salt << 128) | ((seed & (2**64 - 1)) << 64) | row)


def pack_row(task: SyntheticTask, seq_len: int, seed: int, row: int, meta: bool = False) -> dict:
    """Build row ``row`` of the stream: whole problems packed left to right, then PAD.

    Args:
        task: the task generating problems.
        seq_len: T, tokens per row.
        seed: stream seed.
        row: global row index.
        meta: also return ``answer_group`` [T] int64 (the problem's group at answer positions,
            -1 elsewhere), e.g. to report accuracy per proof length.

    Returns:
        The sample dict described in the module docstring.
    """
    rng = _row_rng(task.name, seed, row)
    ids = np.full(seq_len, PAD_ID, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    answer = np.zeros(seq_len, dtype=bool)
    group = np.full(seq_len, -1, dtype=np.int64)
    seq_idx = np.zeros(seq_len, dtype=np.int64)
    pos, doc = 0, 0
    while True:
        prob = task.sample(rng, seq_len)
        n = len(prob.tokens)
        # A problem is never split: the first one that does not fit ends the row (and is dropped).
        if pos + n > seq_len:
            break
        ids[pos : pos + n] = prob.tokens
        labels[pos : pos + n - 1] = prob.tokens[1:]
        seq_idx[pos : pos + n] = doc
        for a in prob.answers:
            answer[pos + a - 1] = True
            group[pos + a - 1] = prob.group
        pos += n
        doc += 1
    if pos == 0:
        raise DataConfigError(f"{task.name}: a problem does not fit in seq_len={seq_len}")
    seq_idx[pos:] = doc
    out = {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "answer_mask": torch.from_numpy(answer),
        "seq_idx": torch.from_numpy(seq_idx),
    }
    if meta:
        out["answer_group"] = torch.from_numpy(group)
    return out


class SyntheticStream(IterableDataset):
    """An infinite, seeded, exactly resumable stream of packed rows of one synthetic task.

    Local row ``j`` of data-parallel ``rank`` is global row ``base + j * world_size + rank``, so
    ranks see disjoint rows. Inside a DataLoader worker, local rows are dealt round-robin over the
    workers (the DataLoader's in-order fetch gives back the same order); the stream's own position
    then lives in the main process, so use ``data_pipeline.loader`` to resume through workers.
    """

    def __init__(
        self,
        task: SyntheticTask,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        meta: bool = False,
    ) -> None:
        if seq_len < 2:
            raise DataConfigError(f"seq_len: must be >= 2, got {seq_len}")
        if not 0 <= rank < world_size:
            raise DataConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise DataConfigError(f"seed: must be >= 0, got {seed}")
        if task.max_len(seq_len) > seq_len:
            raise DataConfigError(
                f"{task.name}: problems take up to {task.max_len(seq_len)} tokens, more than"
                f" seq_len={seq_len}; lower the task's sizes or raise seq_len"
            )
        self.task = task
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.meta = meta
        self._base = 0  # global rows consumed before this (rank, world) layout started
        self._next = 0  # next local row

    def global_row(self, local: int) -> int:
        """Global row index of local row ``local`` of this rank."""
        return self._base + local * self.world_size + self.rank

    def sample(self, local: int) -> dict:
        """Local row ``local`` of this rank (pure function, no side effect)."""
        return pack_row(self.task, self.seq_len, self.seed, self.global_row(local), self.meta)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            start = self._next
            for k in _count(info.id, info.num_workers):
                yield self.sample(start + k)
            return
        while True:
            j = self._next
            row = self.sample(j)
            self._next = j + 1
            yield row

    def state_dict(self) -> dict[str, Any]:
        """Position of this rank: rows consumed so far (by this process's iterators)."""
        return {
            "kind": "synthetic",
            "task": self.task.name,
            "seed": self.seed,
            "base": self._base,
            "next": self._next,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the rows recorded in ``state``.

        A state saved under another data-parallel world size is re-split: all ranks are assumed
        to have consumed the same number of rows (true for lock-step training), so every global
        row below ``base + next * old_world`` is done and the new ranks continue from there.
        """
        if state.get("kind") != "synthetic" or state.get("task") != self.task.name:
            raise DataConfigError(
                f"state is for {state.get('kind')}/{state.get('task')}, not synthetic/{self.task.name}"
            )
        if state["seed"] != self.seed:
            raise DataConfigError(f"state seed {state['seed']} != stream seed {self.seed}")
        if state["world_size"] == self.world_size:
            self._base, self._next = state["base"], state["next"]
        else:
            self._base = state["base"] + state["next"] * state["world_size"]
            self._next = 0


def _count(start: int, step: int) -> Iterator[int]:
    k = start
    while True:
        yield k
        k += step


def split_documents(sample: dict) -> list[tuple[list[int], list[int]]]:
    """Cut a row back into its problems: ``[(doc_tokens, answer_indices_in_doc), ...]``.

    Padding is skipped. Answer indices come from ``answer_mask`` (mask at t marks token t+1).
    """
    ids = sample["input_ids"].tolist()
    mask = sample["answer_mask"].tolist()
    seq = sample["seq_idx"].tolist()
    docs: list[tuple[list[int], list[int]]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or seq[t] != seq[start]:
            toks = ids[start:t]
            if any(tok != PAD_ID for tok in toks):
                answers = [i + 1 for i in range(len(toks) - 1) if mask[start + i]]
                docs.append((toks, answers))
            start = t
    return docs


def check_sample(task: SyntheticTask, sample: dict) -> tuple[int, int]:
    """Solve every problem of a row independently and compare with its answers.

    Also checks the row's invariants (labels are the next token inside a document, -100 across
    documents and on padding; each document ends with EOS; the answer mask sits on real labels).

    Returns:
        ``(n_correct, n_answers)`` over the row.

    Raises:
        AssertionError: a structural invariant of the row is broken.
    """
    ids, labels = sample["input_ids"], sample["labels"]
    seq, mask = sample["seq_idx"], sample["answer_mask"]
    same_doc = torch.zeros_like(mask)
    same_doc[:-1] = seq[1:] == seq[:-1]
    real = ids != PAD_ID
    expect = torch.full_like(labels, IGNORE_INDEX)
    keep = same_doc & real
    keep[:-1] &= real[1:]
    expect[:-1] = torch.where(keep[:-1], ids[1:], expect[:-1])
    assert torch.equal(labels, expect), "labels are not the next token inside each document"
    assert bool((labels[mask] != IGNORE_INDEX).all()), "answer_mask marks an ignored label"
    correct = total = 0
    for toks, answers in split_documents(sample):
        assert toks[-1] == EOS_ID, "a document does not end with EOS"
        for a in answers:
            total += 1
            correct += int(task.solve_next(toks[:a]) == toks[a])
    return correct, total
