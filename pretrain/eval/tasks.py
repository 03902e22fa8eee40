"""Answer accuracy and loss of a model on held-out synthetic tasks.

A ``TaskSpec`` names one evaluation: a synthetic task with its settings (``chaining_h5`` is the
chaining task at proof length 5 only). ``resolve_task_specs`` takes the settings that must match
training (fact table seed, symbol count, ...) from the run config's data source of the same task
when there is one, so that, for example, ``fact_lookup`` asks about the facts the model was
trained on. ``evaluate_tasks`` streams ``batches`` batches of each task from a seed that training
never reads (``heldout_seed``) and scores them with ``pretrain.evaluate.evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data_pipeline.errors import DataConfigError
from data_pipeline.synthetic import SyntheticStream, build_synthetic_stream, build_task
from pretrain.config import RunConfig
from pretrain.eval.errors import EvalError
from pretrain.eval.routing import expert_label_information
from pretrain.evaluate import evaluate
from pretrain.trainer import EVAL_SEED_OFFSET


@dataclass(frozen=True)
class TaskSpec:
    """One held-out evaluation of a synthetic task.

    Attributes:
        name: the key in results (``chaining_h2``).
        task: the synthetic task (``data_pipeline.synthetic.TASKS``).
        task_args: the task's settings (training's, with ``fixed_args`` on top once resolved).
        fixed_args: settings that define this evaluation whatever training used (``hops``).
        expert_information: also measure how much the MoE routing tells about the answer group
            (the domain, for ``domain_mixture``); see ``pretrain.eval.routing``.
    """

    name: str
    task: str
    task_args: dict[str, Any] = field(default_factory=dict)
    fixed_args: dict[str, Any] = field(default_factory=dict)
    expert_information: bool = False


EVAL_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("chaining_h1", "chaining", fixed_args={"hops": [1]}),
        TaskSpec("chaining_h2", "chaining", fixed_args={"hops": [2]}),
        TaskSpec("chaining_h3", "chaining", fixed_args={"hops": [3]}),
        TaskSpec("chaining_h5", "chaining", fixed_args={"hops": [5]}),
        TaskSpec("distant_premise", "distant_premise"),
        TaskSpec("associative_recall", "associative_recall"),
        TaskSpec("fact_lookup", "fact_lookup"),
        TaskSpec("domain_mixture", "domain_mixture", expert_information=True),
    )
}


def heldout_seed(cfg: RunConfig) -> int:
    """The seed of held-out synthetic rows: one no training stage or source of ``cfg`` reads.

    Raises:
        EvalError: a data source pins its own seed to exactly that value.
    """
    seed = cfg.train.seed + EVAL_SEED_OFFSET
    pinned = {s.seed for s in cfg.data.sources if s.seed is not None}
    if seed in pinned:
        raise EvalError(
            f"data source seed {seed} equals the held-out seed train.seed + {EVAL_SEED_OFFSET};"
            " held-out rows would be training rows"
        )
    return seed


def training_task_args(cfg: RunConfig | None, task: str) -> dict[str, Any]:
    """The settings of the first data source of ``task`` in ``cfg`` ({} when there is none)."""
    for source in cfg.data.sources if cfg is not None else ():
        if source.task == task:
            return dict(source.task_args)
    return {}


def resolve_task_specs(
    names: Sequence[str], cfg: RunConfig | None, vocab_size: int, seq_len: int
) -> tuple[list[TaskSpec], dict[str, str]]:
    """Specs for ``names`` with settings from ``cfg``'s data sources, checked to be buildable.

    Args:
        names: keys of ``EVAL_TASKS``.
        cfg: the run config (None: every task with its defaults).
        vocab_size: the model's vocabulary.
        seq_len: the row length the tasks must fit in.

    Returns:
        (specs that can run, {name: why not} for those that cannot at this vocab or seq_len).

    Raises:
        EvalError: a name that is not an evaluation task.
    """
    unknown = [n for n in names if n not in EVAL_TASKS]
    if unknown:
        raise EvalError(f"unknown eval task(s) {unknown}; known: {sorted(EVAL_TASKS)}")
    specs, skipped = [], {}
    for name in names:
        base = EVAL_TASKS[name]
        args = {**training_task_args(cfg, base.task), **base.fixed_args}
        spec = TaskSpec(name, base.task, args, base.fixed_args, base.expert_information)
        try:
            SyntheticStream(build_task(spec.task, vocab_size, **args), seq_len=seq_len)
        except DataConfigError as err:
            skipped[name] = str(err)
            continue
        specs.append(spec)
    return specs, skipped


def task_batches(
    spec: TaskSpec, vocab_size: int, seq_len: int, batches: int, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` batches of [batch_size, seq_len] rows of ``spec`` (with ``answer_group``)."""
    stream = build_synthetic_stream(
        spec.task, vocab_size, seq_len, seed=seed, meta=True, **spec.task_args
    )
    rows = iter(stream)
    for _ in range(batches):
        picked = [next(rows) for _ in range(batch_size)]
        yield {key: torch.stack([row[key] for row in picked]) for key in picked[0]}


def evaluate_tasks(
    model: nn.Module,
    task_specs: Sequence[TaskSpec],
    seq_len: int,
    batches: int,
    device: torch.device | str,
    *,
    batch_size: int = 8,
    seed: int = EVAL_SEED_OFFSET,
    vocab_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Loss, perplexity and answer accuracy of ``model`` on each task, on held-out rows.

    Args:
        model: a ``CausalLM`` (its active paths as they are; put in eval mode meanwhile).
        task_specs: resolved specs (``resolve_task_specs``).
        seq_len: tokens per row.
        batches: batches per task.
        device: where the model is.
        batch_size: rows per batch.
        seed: stream seed of the held-out rows (``heldout_seed(cfg)``).
        vocab_size: the model's vocabulary (default: ``model.cfg.vocab_size``).

    Returns:
        name -> {``accuracy``, ``answers``, ``loss``, ``perplexity``, ``tokens``, ``task``,
        ``task_args``, per-group ``accuracy/group{g}``; with ``expert_information`` and MoE
        layers also ``expert_mi_bits`` and friends (``expert_label_information``)}.
    """
    device = torch.device(device)
    vocab = vocab_size if vocab_size is not None else model.cfg.vocab_size
    results: dict[str, dict[str, Any]] = {}
    for spec in task_specs:
        stream = task_batches(spec, vocab, seq_len, batches, batch_size, seed)
        if spec.expert_information:
            scores, routing = expert_label_information(model, stream, device)
        else:
            scores, routing = evaluate(model, stream, device), {}
        row: dict[str, Any] = {
            k.removeprefix("eval/").replace("answer_", ""): v for k, v in scores.items()
        }
        results[spec.name] = {**row, **routing, "task": spec.task, "task_args": spec.task_args}
    return results
