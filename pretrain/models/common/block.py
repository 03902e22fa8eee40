"""The block every family builds: named, gated, switchable residual paths.

    h = x + sum_{p in parallel} g_p * P(n_p(x))       (paths reading the block input)
    h = h + g_q * Q(n_q(h))                           (then each sequential path in turn)

Each path has its own RMSNorm (unless it normalises its own input) and, when ``gated``, a
learnable scalar gate. A path switched off at run time (by the curriculum) is skipped: it costs
nothing.

Shape legend: B batch, T time, D d_model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.models.common.layers import RMSNorm
from pretrain.models.common.sequence import SequenceContext, resolve_context


class GatedPathBlock(nn.Module):
    """A residual block of named, gated, switchable paths (every family's block).

    Args:
        d_model: residual width.
        paths: path name -> module. Modules named in ``parallel`` read the block input and are
            summed; the others run one after another on the running residual.
        parallel: names of the paths that run in parallel on the block input (default none:
            every path adds to the running residual in turn, as in a pre-norm baseline).
        norm_eps: RMSNorm epsilon.
        gate_init: initial value of every path gate.
        gated: False builds no gates (the Llama / Mamba-2 baselines have none).
    """

    def __init__(
        self,
        d_model: int,
        paths: dict[str, nn.Module],
        parallel: tuple[str, ...] = (),
        norm_eps: float = 1e-5,
        gate_init: float = 1.0,
        gated: bool = True,
    ) -> None:
        super().__init__()
        self.paths = nn.ModuleDict(paths)
        # Paths that normalise their own input (the memories) get no second norm here.
        self.norms = nn.ModuleDict(
            {
                name: nn.Identity()
                if getattr(module, "normalizes_input", False)
                else RMSNorm(d_model, norm_eps)
                for name, module in paths.items()
            }
        )
        self.gates = nn.ParameterDict(
            {name: nn.Parameter(torch.full((1,), gate_init)) for name in paths} if gated else {}
        )
        self.parallel = tuple(name for name in parallel if name in paths)
        self.sequential = tuple(name for name in paths if name not in self.parallel)
        self.gate_init = gate_init
        # Run-time switches (curriculum). Not parameters, not saved: the stage decides them.
        self.active = {name: True for name in paths}
        # Output scale of each path, ramped 0 -> 1 by the curriculum when a path is switched on.
        self.ramp = {name: 1.0 for name in paths}

    def init_weights(self, init_std: float = 0.02) -> None:
        for name, module in self.paths.items():
            module.init_weights(init_std)
            if isinstance(self.norms[name], RMSNorm):
                self.norms[name].init_weights(init_std)
            if name in self.gates:
                nn.init.constant_(self.gates[name], self.gate_init)

    def _run_path(
        self, name: str, x: torch.Tensor, context: SequenceContext, **extra: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.paths[name](self.norms[name](x), context=context, **extra)
        aux = None
        if isinstance(out, tuple):  # MoE returns (y, aux_loss)
            out, aux = out
        if name in self.gates:
            out = self.gates[name].to(out.dtype) * out
        if self.ramp[name] != 1.0:
            out = self.ramp[name] * out
        return out, aux

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        context: SequenceContext | None = None,
        path_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (x' [B, T, D], aux_loss scalar); ``context`` replaces ``seq_idx``.

        ``path_kwargs`` maps a path name to extra keyword arguments of its module (a looped
        layer passes the depth to the paths that use it).
        """
        context = resolve_context(x, seq_idx, context)
        path_kwargs = path_kwargs or {}
        aux_loss = x.new_zeros((), dtype=torch.float32)
        update = None
        for name in self.parallel:
            if not self.active[name]:
                continue
            out, aux = self._run_path(name, x, context, **path_kwargs.get(name, {}))
            update = out if update is None else update + out
            if aux is not None:
                aux_loss = aux_loss + aux
        if update is not None:
            x = x + update
        for name in self.sequential:
            if not self.active[name]:
                continue
            out, aux = self._run_path(name, x, context, **path_kwargs.get(name, {}))
            x = x + out
            if aux is not None:
                aux_loss = aux_loss + aux
        return x, aux_loss
