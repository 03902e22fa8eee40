"""Analytic FLOP count per token, per component, for MFU and for predicted throughput ratios.

Forward FLOPs per token at sequence length T; training is counted as 3x forward (backward = 2x).
Matmuls count 2 FLOPs per multiply-add. Elementwise work (norms, activations, gating) is left
out: it is memory-bound and small next to the matmuls, as in the usual 6N accounting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.models.common.attention import CausalSelfAttention, SparseGlobalAttention
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.common.pkm import ProductKeyMemory
from pretrain.models.common.ssm import Mamba2Mixer
from pretrain.models.common.workspace import WorkspaceMemory
from pretrain.models.lm import CausalLM


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _ssm_flops(m: Mamba2Mixer) -> float:
    cfg = m.cfg
    heads, head_dim, d_state, chunk = m.n_heads, cfg.head_dim, cfg.d_state, cfg.chunk_size
    proj = 2 * (m.in_proj.weight.numel() + m.out_proj.weight.numel())
    # Chunked SSD per token and head: intra-chunk C.B^T (N per pair) and scores @ x (P per pair)
    # over ~chunk/2 causal pairs, chunk state B^T x (N*P), state -> output C.h (N*P).
    scan = heads * (2 * (chunk / 2) * (d_state + head_dim) + 2 * 2 * d_state * head_dim)
    conv = 2 * m.conv1d.weight.numel()
    return proj + scan + conv


def _attention_flops(m: nn.Module, d_model: int, visible: float) -> float:
    heads = m.n_heads
    head_dim = d_model // heads
    proj = 2 * _params(m)
    return proj + 2 * 2 * heads * head_dim * visible  # q.k and p.v over the visible keys


def _sga_visible(cfg, seq_len: int) -> float:
    """Mean number of keys a query sees in SGA: its local window plus completed-chunk summaries."""
    a = cfg.attention
    t = torch.arange(seq_len, dtype=torch.float64)
    local = torch.clamp(t + 1, max=a.window)
    summaries = torch.clamp(torch.floor((t + 1) / a.summary_chunk), max=a.n_global)
    return float((local + summaries).mean())


def component_flops_per_token(model: CausalLM, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of each component of ``model`` at sequence length ``seq_len``."""
    cfg = model.cfg
    out: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        out[name] = out.get(name, 0.0) + value

    for block in model.blocks.values():
        for name, m in block.paths.items():
            if not block.active.get(name, True):
                continue
            if isinstance(m, Mamba2Mixer):
                add("ssm", _ssm_flops(m))
            elif isinstance(m, SparseGlobalAttention):
                add("attention", _attention_flops(m, cfg.d_model, _sga_visible(cfg, seq_len)))
            elif isinstance(m, CausalSelfAttention):
                add("attention", _attention_flops(m, cfg.d_model, (seq_len + 1) / 2))
            elif isinstance(m, ChunkMoE):
                experts = sum(w.numel() for w in (m.experts.w1, m.experts.w2, m.experts.w3))
                add("moe", 2 * (m.router.weight.numel() + experts * m.cfg.top_k / m.cfg.n_experts))
            elif isinstance(m, ProductKeyMemory):
                rows = m.n_heads * m.top_k
                search = 2 * m.n_heads * 2 * m.n_subkeys * (m.d_key // 2)
                add("pkm", 2 * m.query.weight.numel() + search + 2 * rows * m.d_value)
            elif isinstance(m, WorkspaceMemory):
                add("workspace", 2 * _params(m) + 4 * cfg.d_model * cfg.workspace.n_slots * 2)
            else:
                add(name, 2 * _params(m))
    add("head", 2 * cfg.vocab_size * cfg.d_model)
    return out


@dataclass
class FlopCount:
    forward_per_token: float
    components: dict[str, float]

    @property
    def train_per_token(self) -> float:
        return 3.0 * self.forward_per_token


def count_flops(model: CausalLM, seq_len: int) -> FlopCount:
    """Forward and training FLOPs per token of ``model`` at ``seq_len``."""
    parts = component_flops_per_token(model, seq_len)
    return FlopCount(forward_per_token=sum(parts.values()), components=parts)


# Dense bf16 peak of common accelerators, for MFU (TFLOP/s). CPU has no entry: MFU is not reported.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device by name, or None when unknown."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None
