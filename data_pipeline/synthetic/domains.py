"""Domain mixture: several synthetic "domains" with distinct token statistics, for MoE experts.

Domain d owns its own slice of the symbol range, its own Zipf exponent over that slice (so the
unigram statistics differ) and its own fixed permutation ``pi_d`` of the slice (the "world",
fixed by ``world_seed``, shared by every rank, worker and seed). A problem is one domain's text::

    x1 y1 x2 y2 ... xP yP <eos>      x drawn from domain d's Zipf law, y = pi_d(x) (the answers)

A model that identifies the domain (from the slice its tokens come from) and learned ``pi_d``
predicts every ``y``; the answer group is the domain index, for per-domain accuracy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import accumulate

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import Problem, SyntheticTask
from data_pipeline.tokens import EOS_ID


@dataclass
class DomainMixtureTask(SyntheticTask):
    """A weighted mixture of domains with distinct vocabularies, unigram laws and mappings."""

    n_domains: int = 4  # domains; each owns n_symbols // n_domains symbols
    pairs_per_doc: int = 16  # (x, y) pairs per problem
    domain_weights: list[float] | None = None  # mixture weights; None: uniform
    world_seed: int = 0  # fixes the domains' mappings and laws (independent of the stream seed)
    name: str = field(default="domain_mixture", init=False)

    def __post_init__(self) -> None:
        self._check_vocab()
        if self.n_domains < 1 or self.n_symbols // self.n_domains < 2:
            raise DataConfigError(
                f"domain_mixture: n_symbols={self.n_symbols} gives fewer than 2 symbols to each of"
                f" n_domains={self.n_domains}"
            )
        if self.pairs_per_doc < 1:
            raise DataConfigError("domain_mixture.pairs_per_doc: must be >= 1")
        weights = self.domain_weights or [1.0] * self.n_domains
        if len(weights) != self.n_domains or min(weights) < 0 or sum(weights) <= 0:
            raise DataConfigError(
                f"domain_mixture.domain_weights: need {self.n_domains} non-negative weights"
                " with a positive sum"
            )
        self._cum_weights = list(accumulate(weights))
        self._build_world()

    def _build_world(self) -> None:
        rng = random.Random(f"domain_mixture/world/{self.world_seed}")
        size = self.n_symbols // self.n_domains
        self.domain_symbols: list[list[int]] = []
        self.domain_cum_probs: list[list[float]] = []
        self.mapping: dict[int, int] = {}  # x -> pi_d(x), over all domains (slices are disjoint)
        for d in range(self.n_domains):
            syms = [self.symbol(d * size + k) for k in range(size)]
            image = syms[:]
            rng.shuffle(image)
            self.mapping.update(zip(syms, image, strict=True))
            exponent = 0.5 + 1.5 * d / max(self.n_domains - 1, 1)  # distinct Zipf law per domain
            ranks = syms[:]
            rng.shuffle(ranks)  # which symbol is frequent differs per domain too
            self.domain_symbols.append(ranks)
            self.domain_cum_probs.append(
                list(accumulate((r + 1) ** -exponent for r in range(size)))
            )

    def max_len(self, seq_len: int) -> int:
        return 2 * self.pairs_per_doc + 1

    def sample(self, rng: random.Random, seq_len: int) -> Problem:
        d = rng.choices(range(self.n_domains), cum_weights=self._cum_weights)[0]
        xs = rng.choices(
            self.domain_symbols[d], cum_weights=self.domain_cum_probs[d], k=self.pairs_per_doc
        )
        tokens: list[int] = []
        for x in xs:
            tokens += [x, self.mapping[x]]
        tokens.append(EOS_ID)
        return Problem(tokens=tokens, answers=list(range(1, len(tokens) - 1, 2)), group=d)

    def solve_next(self, prefix: list[int]) -> int:
        if len(prefix) % 2 != 1:
            raise ValueError("domain_mixture prefix must end with an x token")
        return self.mapping[prefix[-1]]
