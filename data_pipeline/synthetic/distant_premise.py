"""Distant premise: facts stated at the start, thousands of filler tokens, then a question.

Tokens of one problem (F facts, D filler tokens)::

    K <is> V <sep>      x F, keys distinct
    f f f ... f         D random symbols (never a marker, so they cannot read as a fact)
    Kq <query> Vq <eos> Kq one of the stated keys; Vq its value (the answer)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import Problem, SyntheticTask
from data_pipeline.tokens import EOS_ID, IS_ID, QUERY_ID, SEP_ID


@dataclass
class DistantPremiseTask(SyntheticTask):
    """A fact placed ``distance`` tokens before the question about it."""

    n_facts: int = 4  # facts stated at the start of each problem
    distance: int | None = None  # filler tokens; None: fill the whole row (one problem per row)
    name: str = field(default="distant_premise", init=False)

    def __post_init__(self) -> None:
        self._check_vocab()
        if self.n_facts < 1 or self.n_facts > self.n_symbols:
            raise DataConfigError(
                f"distant_premise.n_facts: must be in [1, n_symbols={self.n_symbols}]"
            )
        if self.distance is not None and self.distance < 0:
            raise DataConfigError("distant_premise.distance: must be >= 0")

    def _filler(self, seq_len: int) -> int:
        overhead = 4 * self.n_facts + 4
        return self.distance if self.distance is not None else max(seq_len - overhead, 0)

    def max_len(self, seq_len: int) -> int:
        return 4 * self.n_facts + 4 + self._filler(seq_len)

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        keys = [self.symbol(k) for k in rng.sample(range(self.n_symbols), self.n_facts)]
        values = [self.symbol(rng.randrange(self.n_symbols)) for _ in keys]
        tokens: list[int] = []
        for k, v in zip(keys, values, strict=True):
            tokens += [k, IS_ID, v, SEP_ID]
        tokens += [self.symbol(rng.randrange(self.n_symbols)) for _ in range(self._filler(seq_len))]
        q = rng.randrange(self.n_facts)
        tokens += [keys[q], QUERY_ID, values[q], EOS_ID]
        return Problem(tokens=tokens, answers=[len(tokens) - 2], group=q)

    def solve_next(self, prefix: list[int]) -> int:
        if len(prefix) < 2 or prefix[-1] != QUERY_ID:
            raise ValueError("distant_premise prefix must end with '<key> <query>'")
        facts: dict[int, int] = {}
        for i in range(len(prefix) - 3):
            if prefix[i + 1] == IS_ID and prefix[i + 3] == SEP_ID:
                facts[prefix[i]] = prefix[i + 2]
        return facts[prefix[-2]]
