"""Parameter account: total and active-per-token parameters, per component.

Active per token counts what one token's forward touches: all dense weights, the top-k of E
experts of each MoE, and the ``n_heads * top_k`` value rows a PKM lookup reads (plus its keys and
query network). Embeddings count in full, as is the convention for published model sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from pretrain.models.lm import CausalLM


@dataclass
class ComponentCount:
    total: int = 0
    active: int = 0


@dataclass
class ParamAccount:
    components: dict[str, ComponentCount] = field(default_factory=dict)

    def add(self, name: str, total: int, active: int) -> None:
        entry = self.components.setdefault(name, ComponentCount())
        entry.total += total
        entry.active += active

    @property
    def total(self) -> int:
        return sum(c.total for c in self.components.values())

    @property
    def active(self) -> int:
        return sum(c.active for c in self.components.values())

    def as_dict(self) -> dict:
        return {
            "total_params": self.total,
            "active_params": self.active,
            "components": {
                name: {"total": c.total, "active": c.active} for name, c in self.components.items()
            },
        }


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _active(module: nn.Module, total: int) -> int:
    """Active-per-token parameters of a path: its own ``active_params()`` where it touches fewer
    than all of them (MoE, PKM), else every one."""
    own = getattr(module, "active_params", None)
    return own() if own is not None else total


def count_parameters(model: CausalLM) -> ParamAccount:
    """Per-component totals and active-per-token counts of ``model`` (works on the meta device)."""
    account = ParamAccount()
    emb = _numel(model.tok_embeddings)
    account.add("embedding", emb, emb)
    for block in model.blocks.values():
        for name, module in block.paths.items():
            total = _numel(module)
            account.add(name, total, _active(module, total))
        norms_and_gates = _numel(block.norms) + sum(p.numel() for p in block.gates.values())
        account.add("norms_gates", norms_and_gates, norms_and_gates)
    final = _numel(model.norm) + (_numel(model.output) if model.output is not None else 0)
    account.add("final_norm_head", final, final)
    if account.total != _numel(model):  # every parameter must be in exactly one component
        raise AssertionError(f"parameter account {account.total} != model total {_numel(model)}")
    return account
