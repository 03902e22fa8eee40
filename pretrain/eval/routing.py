"""How much an MoE's routing says about a label of the data: mutual information I(label; expert).

For ``domain_mixture`` the label of a routing unit is the domain of the document it belongs to,
and the expert is the unit's first choice (the top-1 of its top-k). ``I(domain; expert)`` is 0
bits when routing ignores the domain and ``H(domain)`` when the expert names the domain (at most
``log2(min(domains, experts))``); ``expert_mi_normalized = I / H(domain)`` puts it in [0, 1].

The routing is read with a forward hook on each ``ChunkMoE``: the hook calls the module's public
``route`` on the same input (the router is a small matmul, so recomputing it costs little and
leaves the model code untouched). Counts are per routing unit: a chunk counts once, however many
tokens it holds. ``pretrain.evaluate.evaluate`` runs the forwards, so loss and accuracy come from
the same pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pretrain.evaluate import evaluate
from pretrain.metrics import moe_layers


def document_labels(answer_group: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, T] label of each token's document: the group of its answers (-1: no answers, e.g. PAD).

    Args:
        answer_group: [B, T] int64, the problem's group at answer positions, -1 elsewhere.
        seq_idx: [B, T] int64 document index inside each row (< T).
    """
    batch, seq_len = seq_idx.shape
    rows = torch.arange(batch, device=seq_idx.device).unsqueeze(1)
    doc = (rows * seq_len + seq_idx).reshape(-1)  # [N] a global document id per token
    per_doc = torch.full((batch * seq_len,), -1, dtype=torch.long, device=seq_idx.device)
    per_doc.scatter_reduce_(0, doc, answer_group.reshape(-1).long(), reduce="amax")
    return per_doc[doc].reshape(batch, seq_len)


def mutual_information_bits(counts: torch.Tensor) -> tuple[float, float]:
    """(I(label; expert), H(label)) in bits of a [labels, experts] table of joint counts."""
    joint = counts.double() / counts.sum().clamp_min(1)
    p_label = joint.sum(1, keepdim=True)
    p_expert = joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (p_label @ p_expert)[nz]).log2()).sum()
    h_label = -(p_label[p_label > 0] * p_label[p_label > 0].log2()).sum()
    return float(mi), float(h_label)


class RoutingRecorder:
    """Counts (label, top-1 expert) of every routing unit of every MoE layer while attached.

    Set ``labels`` ([B, T], -1 = not counted) before each forward; ``counts[layer]`` holds a
    [n_labels, n_experts] table.
    """

    def __init__(self, model: nn.Module, n_labels: int) -> None:
        self.labels: torch.Tensor | None = None
        self.n_labels = n_labels
        self.counts: dict[str, torch.Tensor] = {}
        self._handles = [
            moe.register_forward_hook(self._hook(layer), with_kwargs=True)
            for layer, moe in moe_layers(model).items()
        ]

    def _hook(self, layer: str):  # noqa: ANN202 - a forward-hook closure
        def hook(moe: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.labels is None:
                return
            # the forward's own keywords (a looped layer's expert attention adds its depth)
            route_kw = {k: v for k, v in kwargs.items() if k not in ("seq_idx", "context")}
            seq_idx = args[1] if len(args) > 1 else kwargs.get("seq_idx")
            routing = moe.route(args[0], seq_idx, context=kwargs.get("context"), **route_kw)
            # labels are per document and a unit never spans two: its first token's is its own
            units = routing.counted
            unit_label = self.labels.reshape(-1)[units]
            unit_expert = routing.expert_idx[units, 0]
            keep = unit_label >= 0
            n_exp = moe.cfg.n_experts
            flat = unit_label[keep] * n_exp + unit_expert[keep]
            table = torch.bincount(flat, minlength=self.n_labels * n_exp)
            table = table.reshape(self.n_labels, n_exp).cpu()
            self.counts[layer] = self.counts.get(layer, 0) + table

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _labelled(
    batches: Iterable[dict[str, torch.Tensor]], recorder: RoutingRecorder, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    # evaluate() runs one forward per batch right after taking it, so the labels set here
    # are the ones of the forward the hooks see next.
    for batch in batches:
        labels = document_labels(batch["answer_group"], batch["seq_idx"])
        recorder.labels = labels.clamp_max(recorder.n_labels - 1).to(device)
        yield batch


def expert_label_information(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    n_labels: int = 64,
) -> tuple[dict[str, float], dict[str, float]]:
    """``evaluate`` over ``batches`` while measuring I(document group; top-1 expert) per layer.

    Args:
        model: the model; without MoE layers the second dict is empty.
        batches: batches with ``answer_group`` and ``seq_idx`` (``meta=True`` streams).
        device: where the model is.
        n_labels: groups counted (larger groups share the last label).

    Returns:
        (``evaluate``'s scores, {``expert_mi_bits`` (mean over MoE layers),
        ``expert_mi_normalized``, ``label_entropy_bits``, ``expert_mi_bits/L{layer}``,
        ``routing_units`` (units counted per layer: the plug-in estimate of I is biased upwards
        by about (labels - 1)(experts - 1) / (2 ln 2 units) bits)}).
    """
    recorder = RoutingRecorder(model, n_labels)
    try:
        scores = evaluate(model, _labelled(batches, recorder, device), device)
    finally:
        recorder.close()
    if not recorder.counts:
        return scores, {}
    info: dict[str, float] = {}
    entropy = 0.0
    for layer, counts in sorted(recorder.counts.items()):
        info[f"expert_mi_bits/L{layer}"], entropy = mutual_information_bits(counts)
    per_layer = [v for k, v in info.items() if k.startswith("expert_mi_bits/")]
    mean_mi = sum(per_layer) / len(per_layer)
    info["expert_mi_bits"] = mean_mi
    info["label_entropy_bits"] = entropy
    if entropy > 0:  # a single group has nothing to tell apart
        info["expert_mi_normalized"] = mean_mi / entropy
    info["routing_units"] = float(next(iter(recorder.counts.values())).sum())
    return scores, info
