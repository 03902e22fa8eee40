"""Fact lookup: a fixed table of (subject, relation) -> object facts to memorise (for PKM).

The table is the "world", fixed by ``world_seed`` and shared by every rank, worker and stream
seed, so an evaluation stream (another seed) asks about the same facts. A problem asks several
facts::

    s r <query> o <sep>  ...  s r <query> o <eos>      o (the answer) = table[s, r]

Relations are the last ``n_relations`` symbols; subjects and objects the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import accumulate

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import Problem, SyntheticTask
from data_pipeline.tokens import EOS_ID, QUERY_ID, SEP_ID


@dataclass
class FactLookupTask(SyntheticTask):
    """Queries against a fixed random fact table."""

    n_facts: int = 128  # facts in the table
    n_relations: int = 4  # relation symbols
    queries_per_doc: int = 8  # facts asked per problem
    zipf: float = 0.0  # skew of how often each fact is asked (0: uniform)
    world_seed: int = 0  # fixes the table (independent of the stream seed)
    name: str = field(default="fact_lookup", init=False)

    def __post_init__(self) -> None:
        self._check_vocab()
        n_entities = self.n_symbols - self.n_relations
        if self.n_relations < 1 or n_entities < 1:
            raise DataConfigError("fact_lookup.n_relations: must be in [1, n_symbols - 1]")
        if not 1 <= self.n_facts <= n_entities * self.n_relations:
            raise DataConfigError(
                f"fact_lookup.n_facts={self.n_facts}: must be in [1, (n_symbols - n_relations)"
                f" * n_relations = {n_entities * self.n_relations}]"
            )
        if self.queries_per_doc < 1 or self.zipf < 0:
            raise DataConfigError("fact_lookup: queries_per_doc must be >= 1 and zipf >= 0")
        rng = random.Random(f"fact_lookup/world/{self.world_seed}")
        pairs = rng.sample(range(n_entities * self.n_relations), self.n_facts)
        self.keys = [
            (self.symbol(p // self.n_relations), self.symbol(n_entities + p % self.n_relations))
            for p in pairs
        ]
        self.table: dict[tuple[int, int], int] = {
            k: self.symbol(rng.randrange(n_entities)) for k in self.keys
        }
        self._cum = list(accumulate((i + 1) ** -self.zipf for i in range(self.n_facts)))

    def max_len(self, seq_len: int) -> int:
        return 5 * self.queries_per_doc

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        asked = rng.choices(self.keys, cum_weights=self._cum, k=self.queries_per_doc)
        tokens: list[int] = []
        answers = []
        for s, r in asked:
            tokens += [s, r, QUERY_ID, self.table[s, r], SEP_ID]
            answers.append(len(tokens) - 2)
        tokens[-1] = EOS_ID
        return Problem(tokens=tokens, answers=answers)

    def solve_next(self, prefix: list[int]) -> int:
        if len(prefix) < 3 or prefix[-1] != QUERY_ID:
            raise ValueError("fact_lookup prefix must end with '<subject> <relation> <query>'")
        return self.table[prefix[-3], prefix[-2]]
