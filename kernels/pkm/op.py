"""The PKM weighted bag of value rows with a choice of backend: ``torch`` or ``triton``.

Shape legend: R value rows, Dv value size, n bags (queries), k rows per bag.
"""

from __future__ import annotations

import torch

from kernels.backends import TRITON_MODULES, load_backend_function
from kernels.pkm.ref import pkm_lookup_ref


def pkm_lookup(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """Weighted bag ``out[n] = sum_j weights[n, j] * values[indices[n, j]]`` on the chosen backend.

    Args:
        values: [R, Dv] value table.
        indices: [n, k] int64 (or int32) rows in 0..R-1 (repeats allowed).
        weights: [n, k] per-row weights.
        backend: ``torch`` (``F.embedding_bag``, the reference) | ``triton`` (its value gradient
            is the deterministic sorted reduction when ``torch.use_deterministic_algorithms`` is
            on, atomic adds otherwise).

    Returns:
        [n, Dv] in the table's dtype.

    Raises:
        BackendUnavailableError: the backend's module cannot be imported.
        ValueError: unknown backend.
    """
    if backend == "torch":
        return pkm_lookup_ref(values, indices, weights)
    if backend == "triton":
        lookup = load_backend_function("pkm", "triton", *TRITON_MODULES["pkm"])
        return lookup(values, indices, weights)
    raise ValueError(f"unknown pkm backend '{backend}'; known: torch, triton")
