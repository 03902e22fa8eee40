"""Expert attention: a token mixture of experts written as sparse attention over learned expert
keys, routed with the depth index (Dreamer's third attention).

Shape legend: N tokens, D d_model, Q key size (``dreamer.expert_key_dim``), E experts, k chosen
experts, R iterations.

    q_t   = W_q x_t + d_r                    (d_r: learned embedding of the depth index r)
    s_te  = sigmoid(q_t . K_e / sqrt(Q))     (K_e: the learned key of expert e)
    y_t   = sum_{e in top-k(s_t + b)} s_te / (sum of the chosen s_t) * SwiGLU_e(x_t)

The values are the SwiGLU experts, and everything after the scores is the MoE's: dropless
sorted dispatch (and its expert-parallel dispatcher when installed), the aux-loss-free balancing
bias ``b`` updated once per optimizer step, the balance and z losses (``ChunkMoE``). Routing is
per token (``model.moe.routing=token``) with sigmoid scores (``score_func=sigmoid``). Because
``d_r`` enters the query, a token can pick other experts at every depth; the load is also
counted per depth (``depth_load``), and the sets chosen at each depth of the last training
forward are kept for the selection-diversity metrics (``pretrain.models.common.selection``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.common.layers import wide_linear
from pretrain.models.common.moe import ChunkMoE
from pretrain.models.common.selection import (
    distinct_experts_per_token,
    max_set_entropy_bits,
    set_entropy_bits,
)
from pretrain.models.config import MoEConfig


class ExpertAttention(ChunkMoE):
    """Sparse sigmoid attention over E expert keys whose values are SwiGLU experts.

    Args:
        d_model: D.
        cfg: the MoE section (token routing, sigmoid scores; checked by the family).
        key_dim: Q.
        max_depth: iterations the depth embedding is sized for.
    """

    uses_depth_index = True  # the shared layer passes ``depth_index=`` (0-d tensor r)

    def __init__(self, d_model: int, cfg: MoEConfig, key_dim: int, max_depth: int) -> None:
        super().__init__(d_model, cfg)
        self.key_dim = key_dim
        self.router = nn.Linear(key_dim, cfg.n_experts, bias=False)  # [E, Q]: the expert keys
        self.query = nn.Linear(d_model, key_dim, bias=False)
        self.depth_embedding = nn.Embedding(max_depth, key_dim)
        # [R_max, E] (token, slot) assignments per depth since the last optimizer step, and the
        # last step's (summed over the routing ranks): the per-depth expert load
        self.register_buffer(
            "tokens_per_depth", torch.zeros(max_depth, cfg.n_experts), persistent=False
        )
        self.register_buffer("depth_load", torch.zeros(max_depth, cfg.n_experts), persistent=False)
        self.depth_selections: list[torch.Tensor] = []  # [N, k] per depth, last forward
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, init_std: float = 0.02) -> None:
        super().init_weights(init_std)
        if hasattr(self, "query"):  # the MoE's constructor calls this before they exist
            nn.init.normal_(self.query.weight, std=init_std)
            nn.init.normal_(self.depth_embedding.weight, std=init_std)
            # unit-norm keys: the score scale is learned through the query
            nn.init.normal_(self.router.weight, std=1.0 / math.sqrt(self.key_dim))
            self.tokens_per_depth.zero_()
            self.depth_load.zero_()

    def router_logits(self, x: torch.Tensor, depth_index: torch.Tensor) -> torch.Tensor:
        """[N, D] token states (any dtype) -> [N, E] scores q . K / sqrt(Q) in fp32 at least,
        with the depth in the query.

        ``depth_index`` is r as a 0-d tensor, so that a compiled layer serves every iteration.
        """
        q = wide_linear(x, self.query.weight)  # [N, Q]
        q = q + self.depth_embedding(depth_index).to(q.dtype)
        return F.linear(q, self.router.weight.to(q.dtype)) / math.sqrt(self.key_dim)

    def _add_load(self, counts: torch.Tensor, depth_index: torch.Tensor) -> None:
        super()._add_load(counts)
        self.tokens_per_depth.index_add_(
            0, depth_index[None], counts[None].to(self.tokens_per_depth.dtype)
        )

    def keep_selection(self, expert_idx: torch.Tensor, depth_index: torch.Tensor) -> None:
        self.depth_selections.append(expert_idx)  # only the metrics read it

    def begin_forward(self) -> None:
        """A new forward of the stack starts: forget the last one's per-depth selections."""
        self.depth_selections = []

    @torch.no_grad()
    def after_optimizer_step(self, stepped: bool) -> None:
        """The MoE's balancing step, and the per-depth load of the step (summed over ranks)."""
        load = self.tokens_per_depth
        if stepped:
            self.depth_load.copy_(self.reducer.sum(load) if self.reducer is not None else load)
        else:
            self.depth_load.zero_()
        load.zero_()
        super().after_optimizer_step(stepped)

    def flops_breakdown(self, seq_len: int) -> dict[str, float]:
        """The MoE's parts, the ``router`` adding the query W_q x to the scores against the
        expert keys."""
        out = super().flops_breakdown(seq_len)
        out["router"] += 2 * self.query.weight.numel()
        return out

    def selection_metrics(self) -> dict[str, float]:
        """Per depth r of the last step: the expert load (``depth{r}/expert{e}``, fractions of
        that depth's assignments) and, of the last training forward, the entropy of the chosen
        sets (``depth{r}/set_entropy_bits``); across depths, the distinct experts a token used
        (``distinct_experts_per_token``, k .. min(E, R k))."""
        n_exp = self.cfg.n_experts
        out = {"set_entropy_max_bits": max_set_entropy_bits(n_exp, self.cfg.top_k)}
        for r, load in enumerate(self.depth_load):
            total = load.sum()
            if total > 0:
                for e, frac in enumerate((load / total).tolist()):
                    out[f"depth{r}/expert{e}"] = frac
        if self.depth_selections:
            selections = torch.stack(self.depth_selections)  # [R, N, k]
            out["distinct_experts_per_token"] = distinct_experts_per_token(selections, n_exp)
            for r, chosen in enumerate(self.depth_selections):
                out[f"depth{r}/set_entropy_bits"] = set_entropy_bits(chosen, n_exp)
        return out
