"""Associative recall (multi-query): key-value pairs, a separator, then queried keys.

Tokens of one problem (P pairs, Q queries)::

    k1 v1 k2 v2 ... kP vP <sep> q1 a1 q2 a2 ... qQ aQ <eos>

Keys are distinct symbols from the first half of the symbol range, values from the second half;
each ``a`` (an answer) is the value paired with the key ``q`` just before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import Problem, SyntheticTask
from data_pipeline.tokens import EOS_ID, SEP_ID


@dataclass
class RecallTask(SyntheticTask):
    """Multi-query associative recall."""

    n_pairs: int = 8  # key-value pairs per problem
    n_queries: int = 4  # queried keys per problem (answers)
    name: str = field(default="associative_recall", init=False)

    def __post_init__(self) -> None:
        self._check_vocab()
        if self.n_pairs < 1 or self.n_queries < 1:
            raise DataConfigError("associative_recall: n_pairs and n_queries must be >= 1")
        if self.n_pairs > self.n_symbols // 2:
            raise DataConfigError(
                f"associative_recall.n_pairs={self.n_pairs} needs distinct keys: must be <="
                f" n_symbols // 2 = {self.n_symbols // 2}"
            )

    def max_len(self, seq_len: int) -> int:
        return 2 * self.n_pairs + 1 + 2 * self.n_queries + 1

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        half = self.n_symbols // 2
        keys = [self.symbol(k) for k in rng.sample(range(half), self.n_pairs)]
        values = [self.symbol(half + rng.randrange(self.n_symbols - half)) for _ in keys]
        tokens: list[int] = []
        for k, v in zip(keys, values, strict=True):
            tokens += [k, v]
        tokens.append(SEP_ID)
        answers = []
        for _ in range(self.n_queries):
            q = rng.randrange(self.n_pairs)
            tokens += [keys[q], values[q]]
            answers.append(len(tokens) - 1)
        tokens.append(EOS_ID)
        return Problem(tokens=tokens, answers=answers)

    def solve_next(self, prefix: list[int]) -> int:
        sep = prefix.index(SEP_ID)
        pairs = prefix[:sep]
        if len(pairs) % 2 or (len(prefix) - sep - 1) % 2 != 1:
            raise ValueError("associative_recall prefix must end with a queried key")
        table = dict(zip(pairs[0::2], pairs[1::2], strict=True))
        return table[prefix[-1]]
