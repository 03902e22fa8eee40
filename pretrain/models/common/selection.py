"""How diverse a mixture's expert selection is: statistics of the chosen expert *sets*.

Shape legend: N tokens, k experts per token, E experts, R routing passes over the same tokens
(depth iterations of a looped layer).

- ``set_entropy_bits``: entropy of the distribution of k-expert sets over tokens, in bits (0: every
  token uses the same experts; at most log2 C(E, k), or log2 N with N tokens).
- ``distinct_sets``: how many different k-expert sets the tokens use.
- ``distinct_experts_per_token``: over R passes of the same tokens through the same experts (a
  shared layer looped over depth), the mean number of different experts a token uses, from k
  (the same set at every depth) to min(E, R * k).
"""

from __future__ import annotations

import math

import torch


def _set_counts(expert_idx: torch.Tensor) -> torch.Tensor:
    """[N, k] chosen experts -> how many tokens chose each different (unordered) set."""
    ordered = expert_idx.sort(dim=-1).values  # rows, not an integer code: no overflow at any E, k
    return ordered.unique(dim=0, return_counts=True)[1]


def set_entropy_bits(expert_idx: torch.Tensor, n_experts: int) -> float:
    """Entropy in bits of the k-expert sets chosen by the [N, k] tokens."""
    counts = _set_counts(expert_idx)
    p = counts.double() / counts.sum()
    return float(-(p * p.log2()).sum())


def distinct_sets(expert_idx: torch.Tensor, n_experts: int) -> int:
    """Number of different k-expert sets among the [N, k] tokens."""
    return int(_set_counts(expert_idx).numel())


def distinct_experts_per_token(selections: torch.Tensor, n_experts: int) -> float:
    """[R, N, k] experts chosen by the same N tokens at R depths -> mean distinct experts used."""
    depths, n_tokens, _ = selections.shape
    used = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=selections.device)
    rows = torch.arange(n_tokens, device=selections.device)[:, None]
    for r in range(depths):
        used[rows, selections[r]] = True
    return float(used.sum(1).double().mean())


def max_set_entropy_bits(n_experts: int, top_k: int) -> float:
    """log2 C(E, k): the entropy of a uniform choice among every k-expert set."""
    return math.log2(math.comb(n_experts, top_k))
