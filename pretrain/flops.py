"""Analytic FLOP count per token, per component, for MFU and for predicted throughput ratios.

Forward FLOPs per token at sequence length T; training is counted as 3x forward (backward = 2x).
Matmuls count 2 FLOPs per multiply-add. Elementwise work (norms, activations, gating) is left
out: it is memory-bound and small next to the matmuls, as in the usual 6N accounting. Each path
module reports its own count (``flops_per_token(seq_len)``); this module only sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pretrain.models.lm import CausalLM


def path_flops_per_token(module: nn.Module, seq_len: int, runs: float = 1.0) -> float:
    """Forward FLOPs per token of one block path run ``runs`` times: its own
    ``flops_for_runs(seq_len, runs)`` where the cost of a run depends on how many came before
    (depth attention), else ``runs`` times its ``flops_per_token(seq_len)``, or two per weight
    for a module that reports neither (a plain per-token map)."""
    for_runs = getattr(module, "flops_for_runs", None)
    if for_runs is not None:
        return for_runs(seq_len, runs)
    own = getattr(module, "flops_per_token", None)
    if own is not None:
        return runs * own(seq_len)
    return runs * 2 * sum(p.numel() for p in module.parameters())


def component_flops_per_token(
    model: CausalLM, seq_len: int, training: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token of each component of ``model`` at sequence length ``seq_len``.

    Components are the block paths (keyed by path name, active ones only) plus the head; a block
    that the stack runs several times per forward (a looped block) counts once per run, at
    evaluation settings or (``training``) at the next training step's (a looped block's R).
    """
    cfg = model.cfg
    out: dict[str, float] = {}
    runs = model.stack.runs_per_forward(training)
    for block_name, block in model.blocks.items():
        for name, m in block.paths.items():
            if block.active.get(name, True):
                flops = path_flops_per_token(m, seq_len, runs[block_name])
                out[name] = out.get(name, 0.0) + flops
    out["head"] = float(2 * cfg.vocab_size * cfg.d_model)
    return out


@dataclass
class FlopCount:
    forward_per_token: float
    components: dict[str, float]

    @property
    def train_per_token(self) -> float:
        return 3.0 * self.forward_per_token


def count_flops(model: CausalLM, seq_len: int, training: bool = False) -> FlopCount:
    """Forward and training FLOPs per token of ``model`` at ``seq_len`` (``training``: with
    the stack's per-step settings of the next training step, see ``component_flops_per_token``)."""
    parts = component_flops_per_token(model, seq_len, training)
    return FlopCount(forward_per_token=sum(parts.values()), components=parts)


# Dense bf16 peak of common accelerators, for MFU (TFLOP/s). CPU has no entry: MFU is not reported.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device by name, or None when unknown."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
