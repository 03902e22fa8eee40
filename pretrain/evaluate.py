"""Evaluation on held-out batches: loss, perplexity and answer accuracy of synthetic tasks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from pretrain.loss import IGNORE_INDEX


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Token-weighted loss and perplexity over ``batches``; answer accuracy where an
    ``answer_mask`` marks answer positions (exact match of the argmax prediction)."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct, answers = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], seq_idx=batch.get("seq_idx")).logits.float()
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        loss_sum += torch.nn.functional.cross_entropy(
            logits[valid], labels[valid], reduction="sum"
        ).item()
        tokens += int(valid.sum())
        if "answer_mask" in batch:
            mask = batch["answer_mask"] & valid
            correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
            answers += int(mask.sum())
    model.train(was_training)
    loss = loss_sum / max(tokens, 1)
    out = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": float(tokens)}
    if answers:
        out["eval/answer_accuracy"] = correct / answers
    return out
