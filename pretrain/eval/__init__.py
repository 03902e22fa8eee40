"""Evaluation of trained models: held-out synthetic tasks, held-out shards, expert routing.

    from pretrain.eval import EVAL_TASKS, evaluate_tasks, load_checkpoint_model, resolve_task_specs
    loaded = load_checkpoint_model("runs/hydra-tiny")            # newest checkpoint that verifies
    specs, skipped = resolve_task_specs(list(EVAL_TASKS), loaded.cfg, vocab_size=128, seq_len=256)
    results = evaluate_tasks(loaded.model, specs, seq_len=256, batches=8, device="cpu",
                             seed=heldout_seed(loaded.cfg))

``hydra-pretrain eval`` (``launch/evaluation.py``) is the command line around these, and
``benchmarks/ablations.py`` scores its runs with ``evaluate_tasks``.
"""

from pretrain.eval.checkpoint import LoadedCheckpoint, checkpoint_candidates, load_checkpoint_model
from pretrain.eval.errors import EvalError
from pretrain.eval.heldout import evaluate_shards, shard_reader
from pretrain.eval.routing import expert_label_information, mutual_information_bits
from pretrain.eval.tasks import (
    EVAL_TASKS,
    TaskSpec,
    evaluate_tasks,
    heldout_seed,
    resolve_task_specs,
)

__all__ = [
    "EVAL_TASKS",
    "EvalError",
    "LoadedCheckpoint",
    "TaskSpec",
    "checkpoint_candidates",
    "evaluate_shards",
    "evaluate_tasks",
    "expert_label_information",
    "heldout_seed",
    "load_checkpoint_model",
    "mutual_information_bits",
    "resolve_task_specs",
    "shard_reader",
]
