"""Multi-step logical chaining: premises ``A -> B``, ``B -> C``, ... shuffled among distractor
chains, then the query ``A ?`` whose answer is the end of A's chain, ``hops`` steps away.

Tokens of one problem (L = hops, D = distractor chains, every chain has L edges)::

    X <arrow> Y <sep>   x (L * (1 + D)) premises, shuffled
    A <query> Z <eos>   Z = the entity L hops from A (the answer)

Every entity has at most one outgoing edge and chains share no entity, so the answer is unique;
distractor chains have the same length as the true one, so length gives nothing away.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import Problem, SyntheticTask
from data_pipeline.tokens import ARROW_ID, EOS_ID, QUERY_ID, SEP_ID


@dataclass
class ChainingTask(SyntheticTask):
    """Multi-step logical chaining at the proof lengths in ``hops`` (drawn uniformly)."""

    # proof lengths L, drawn uniformly over the list: repeat one to weight it ([1, 1, 2])
    hops: list[int] = field(default_factory=lambda: [2, 3])
    n_distractors: int = 2  # distractor chains per problem, each with L edges
    name: str = field(default="chaining", init=False)

    def __post_init__(self) -> None:
        self.hops = [int(h) for h in self.hops]
        if not self.hops or min(self.hops) < 1:
            raise DataConfigError(f"chaining.hops: needs proof lengths >= 1, got {self.hops}")
        if self.n_distractors < 0:
            raise DataConfigError("chaining.n_distractors: must be >= 0")
        self._check_vocab()
        need = (max(self.hops) + 1) * (1 + self.n_distractors)
        if self.n_symbols < need:
            raise DataConfigError(
                f"chaining: n_symbols={self.n_symbols} is too small for hops={max(self.hops)} with"
                f" {self.n_distractors} distractor chains: needs (hops+1)*(1+n_distractors)={need}"
            )

    def max_len(self, seq_len: int) -> int:
        return 4 * max(self.hops) * (1 + self.n_distractors) + 4

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        hops = rng.choice(self.hops)
        n_chains = 1 + self.n_distractors
        ents = [self.symbol(k) for k in rng.sample(range(self.n_symbols), (hops + 1) * n_chains)]
        chains = [ents[c * (hops + 1) : (c + 1) * (hops + 1)] for c in range(n_chains)]
        premises = [(ch[i], ch[i + 1]) for ch in chains for i in range(hops)]
        rng.shuffle(premises)
        tokens: list[int] = []
        for x, y in premises:
            tokens += [x, ARROW_ID, y, SEP_ID]
        tokens += [chains[0][0], QUERY_ID, chains[0][-1], EOS_ID]
        return Problem(tokens=tokens, answers=[len(tokens) - 2], group=hops)

    def solve_next(self, prefix: list[int]) -> int:
        if len(prefix) < 2 or prefix[-1] != QUERY_ID:
            raise ValueError("chaining prefix must end with '<entity> <query>'")
        edges: dict[int, int] = {}
        body = prefix[:-2]
        if len(body) % 4:
            raise ValueError("chaining premises must be 4 tokens each")
        for i in range(0, len(body), 4):
            x, arrow, y, sep = body[i : i + 4]
            if arrow != ARROW_ID or sep != SEP_ID or x in edges:
                raise ValueError(f"malformed or ambiguous premise at token {i}")
            edges[x] = y
        node, seen = prefix[-2], set()
        while node in edges:
            if node in seen:
                raise ValueError("premises form a cycle")
            seen.add(node)
            node = edges[node]
        return node
