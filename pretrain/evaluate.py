"""Evaluation on held-out batches: loss, perplexity and answer accuracy of synthetic tasks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pretrain.loss import IGNORE_INDEX


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    split: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], Any]] | None = None,
    sum_over_ranks: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, float]:
    """Token-weighted loss and perplexity over ``batches``; answer accuracy where an
    ``answer_mask`` marks answer positions (exact match of the argmax prediction).

    Batches that also carry ``answer_group`` [B, T] (synthetic streams built with ``meta=True``)
    add ``eval/answer_accuracy/group{g}`` for every group g seen when there are several (e.g.
    per domain).

    ``split`` (context parallelism) cuts each batch to this rank's slice and gives the model its
    sequence context. ``sum_over_ranks`` sums the loss, token and answer counts over the ranks
    before the ratios are taken, so loss and accuracy are token-weighted over the global batch
    (data- and context-parallel alike); per-group accuracies are then left out (ranks may see
    different groups, and each key is reduced over the ranks by the caller).

    Returns:
        ``eval/loss``, ``eval/perplexity``, ``eval/tokens``; with answers also
        ``eval/answer_accuracy``, ``eval/answers`` (their count) and the per-group accuracies.
    """
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct, answers = 0.0, 0, 0, 0
    group_hits: dict[int, list[int]] = {}  # group -> [correct, answers]
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        context = None
        if split is not None:
            batch, context = split(batch)
        logits = model(batch["input_ids"], seq_idx=batch.get("seq_idx"), context=context)
        logits = logits.logits.float()
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        loss_sum += torch.nn.functional.cross_entropy(
            logits[valid], labels[valid], reduction="sum"
        ).item()
        tokens += int(valid.sum())
        if "answer_mask" in batch:
            mask = batch["answer_mask"] & valid
            hit = logits.argmax(-1)[mask] == labels[mask]
            correct += int(hit.sum())
            answers += int(mask.sum())
            if "answer_group" in batch:
                _count_groups(group_hits, batch["answer_group"][mask], hit)
    model.train(was_training)
    if sum_over_ranks is not None:
        loss_sum, tokens, correct, answers = sum_over_ranks([loss_sum, tokens, correct, answers])
    loss = loss_sum / max(tokens, 1)
    out = {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/tokens": float(tokens),
    }
    if answers:
        out["eval/answer_accuracy"] = correct / answers
        out["eval/answers"] = float(answers)
        if len(group_hits) > 1 and sum_over_ranks is None:  # one group: the overall accuracy
            for group, (hits, n) in sorted(group_hits.items()):
                out[f"eval/answer_accuracy/group{group}"] = hits / n
    return out


def _count_groups(acc: dict[int, list[int]], groups: torch.Tensor, hit: torch.Tensor) -> None:
    for group in groups.unique().tolist():
        sel = groups == group
        entry = acc.setdefault(int(group), [0, 0])
        entry[0] += int(hit[sel].sum())
        entry[1] += int(sel.sum())
