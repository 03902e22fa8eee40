"""Synthetic tasks, generated on the fly, seeded, infinite and exactly resumable.

    from data_pipeline.synthetic import build_synthetic_stream, SPECIAL_TOKENS
    stream = build_synthetic_stream("chaining", vocab_size=256, seq_len=256, seed=0,
                                    hops=[2, 3], n_symbols=64)
    sample = next(iter(stream))   # input_ids, labels, answer_mask, seq_idx: [seq_len] tensors
    state = stream.state_dict(); stream.load_state_dict(state)

Tasks: ``chaining``, ``distant_premise``, ``associative_recall``, ``domain_mixture``,
``fact_lookup``. Each has an independent solver (``task.solve_next``) used by ``check_sample``.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic.base import (
    Problem,
    SyntheticStream,
    SyntheticTask,
    check_sample,
    pack_row,
    split_documents,
)
from data_pipeline.synthetic.chaining import ChainingTask
from data_pipeline.synthetic.distant_premise import DistantPremiseTask
from data_pipeline.synthetic.domains import DomainMixtureTask
from data_pipeline.synthetic.facts import FactLookupTask
from data_pipeline.synthetic.recall import RecallTask
from data_pipeline.tokens import SPECIAL_TOKENS

TASKS: dict[str, type[SyntheticTask]] = {
    "chaining": ChainingTask,
    "distant_premise": DistantPremiseTask,
    "associative_recall": RecallTask,
    "domain_mixture": DomainMixtureTask,
    "fact_lookup": FactLookupTask,
}


def build_task(name: str, vocab_size: int, **kwargs: Any) -> SyntheticTask:
    """Build task ``name`` with its keyword settings (unknown settings are an error)."""
    if name not in TASKS:
        raise DataConfigError(f"unknown synthetic task '{name}'; known tasks: {sorted(TASKS)}")
    cls = TASKS[name]
    allowed = {f for f in cls.__dataclass_fields__ if f not in ("name", "vocab_size")}
    unknown = set(kwargs) - allowed
    if unknown:
        raise DataConfigError(
            f"synthetic task '{name}': unknown settings {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return cls(vocab_size=vocab_size, **kwargs)


def build_synthetic_stream(
    task: str,
    vocab_size: int,
    seq_len: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    meta: bool = False,
    **task_kwargs: Any,
) -> SyntheticStream:
    """An infinite, seeded, resumable stream of packed rows of a synthetic task.

    Args:
        task: task name (see ``TASKS``).
        vocab_size: the model's vocabulary; too small for the task's symbols is an error.
        seq_len: T, tokens per row.
        seed: stream seed (rows are a pure function of (task, seed, row index)).
        rank: data-parallel rank (ranks see disjoint rows).
        world_size: data-parallel world size.
        meta: add ``answer_group`` [T] int64 to each sample (e.g. the proof length).
        **task_kwargs: the task's own settings, e.g. ``hops=[2, 3], n_symbols=64`` for chaining.

    Returns:
        A ``SyntheticStream``; each item is a dict with ``input_ids`` [T] int64, ``labels`` [T]
        int64 (-100 = ignore), ``answer_mask`` [T] bool and ``seq_idx`` [T] int64.
    """
    return SyntheticStream(
        build_task(task, vocab_size, **task_kwargs),
        seq_len=seq_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
        meta=meta,
    )


__all__ = [
    "SPECIAL_TOKENS",
    "TASKS",
    "ChainingTask",
    "DistantPremiseTask",
    "DomainMixtureTask",
    "FactLookupTask",
    "Problem",
    "RecallTask",
    "SyntheticStream",
    "SyntheticTask",
    "build_synthetic_stream",
    "build_task",
    "check_sample",
    "pack_row",
    "split_documents",
]
