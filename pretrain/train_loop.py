"""A single-process training loop on a built-in synthetic task.

Reads top to bottom: batch -> forward/backward with accumulation -> clip -> optimizer step ->
routing-bias update -> log. The full trainer (checkpoints, curriculum, MLflow, parallel
backends) grows from this loop; keep each step a function call so it can.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from data_pipeline.synthetic import build_synthetic_stream
from pretrain.config import RunConfig
from pretrain.loss import lm_loss
from pretrain.models import build_model
from pretrain.models.common.moe import ChunkMoE
from pretrain.optim import build_optimizer, cosine_with_warmup, set_lr


@dataclass
class StepMetrics:
    step: int
    loss: float
    aux_loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def synthetic_batches(cfg: RunConfig, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of ``train.batch_size`` packed rows of the configured synthetic task."""
    source = cfg.data.sources[0]
    stream = build_synthetic_stream(
        source.task or "chaining",
        vocab_size=cfg.model.vocab_size,
        seq_len=cfg.train.seq_len,
        seed=cfg.train.seed,
        **source.task_args,
    )
    rows = iter(stream)
    while True:
        samples = [next(rows) for _ in range(cfg.train.batch_size)]
        yield {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 on GPU; fp32 on CPU (CPU bf16 matmuls are slow and the tests compare in fp32).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(cfg: RunConfig, log: Callable[[str], None] = print) -> list[StepMetrics]:
    """Train ``cfg.model`` for ``cfg.train.steps`` optimizer steps; returns the per-step metrics."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = resolve_device(tc.device)
    model = build_model(cfg.model, device=device)
    optimizer = build_optimizer(
        model, tc.lr, tc.weight_decay, tuple(tc.betas), pkm_value_lr=tc.pkm_value_lr
    )
    moe_layers = [m for m in model.modules() if isinstance(m, ChunkMoE)]
    batches = synthetic_batches(cfg, device)
    history: list[StepMetrics] = []
    log(
        f"training {cfg.model.family} on {device}: {tc.steps} steps, "
        f"{tc.batch_size * tc.grad_accum * tc.seq_len} tokens/step"
    )
    for step in range(tc.steps):
        t0 = time.perf_counter()
        lr_mult = cosine_with_warmup(step, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        set_lr(optimizer, tc.lr, lr_mult)
        loss_sum, aux_sum, tokens = 0.0, 0.0, 0
        for _ in range(tc.grad_accum):
            batch = next(batches)
            with _autocast(device):
                out = model(batch["input_ids"], seq_idx=batch["seq_idx"])
            loss = lm_loss(out.logits, batch["labels"])
            ((loss + out.aux_loss) / tc.grad_accum).backward()
            loss_sum += loss.item()
            aux_sum += out.aux_loss.item()
            tokens += batch["input_ids"].numel()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for moe in moe_layers:  # once per optimizer step, not per micro-batch
            moe.update_routing_bias()
        elapsed = time.perf_counter() - t0
        metrics = StepMetrics(
            step=step + 1,
            loss=loss_sum / tc.grad_accum,
            aux_loss=aux_sum / tc.grad_accum,
            grad_norm=float(grad_norm),
            lr=tc.lr * lr_mult,
            tokens_per_s=tokens / elapsed,
        )
        history.append(metrics)
        if metrics.step % tc.log_every == 0 or metrics.step in (1, tc.steps):
            log(
                f"step {metrics.step:>5d} | loss {metrics.loss:.4f} | aux {metrics.aux_loss:.4f}"
                f" | grad_norm {metrics.grad_norm:.3f} | lr {metrics.lr:.2e}"
                f" | tokens/s {metrics.tokens_per_s:,.0f}"
            )
    return history
