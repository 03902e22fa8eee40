"""Incremental decoding: the state a model keeps per sequence between calls (``DecodeCache``).

    cache = new_decode_cache(model, batch=1)
    logits = model(prompt_ids, cache=cache).logits          # [B, T, V], fills the cache
    logits = model(next_ids, cache=cache).logits            # [B, 1, V], one more position

Each call continues the one document of every row at ``cache.position`` (all rows at the same
position; no ``seq_idx``) and gives the logits a full forward of the whole sequence gives at
the new positions (``tests/pretrain/test_generate.py``). A call may bring any number of tokens.
Call in eval mode under ``torch.no_grad()``.

The state is kept per block *run* (a block looped over depth keeps one per iteration) and per
path: each path that mixes along time has ``decode_state(batch, context_len, device=, dtype=)``
and takes the state as ``cache=`` in its forward, which updates it in place. The SSM keeps its
scan and conv states, attention its keys/values (a window and chunk summaries for sparse global
attention, boundary keys for Attamba), the workspace its slots, chunk-routed MoE the routing of
the current unit. FFN, PKM, token-routed MoE and depth attention work per token: nothing.
``decode_state(context_len=N)`` sizes a state as after N tokens (zeros): on the meta device
that measures the cache of a long context without decoding it (``benchmarks/cache_bytes.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pretrain.models.common.sequence import SequenceContext
from pretrain.models.stack import RunBlock

if TYPE_CHECKING:
    from pretrain.models.lm import CausalLM


@dataclass
class DecodeCache:
    """The decode state of a batch of sequences.

    Attributes:
        position: tokens of each row consumed so far (the next token's position).
        states: (block name, run index) -> path name -> the path's state.
    """

    position: int
    states: dict[tuple[str, int], dict[str, Any]]

    def context(self, batch: int, length: int, device: torch.device) -> SequenceContext:
        """The sequence context of ``length`` new tokens: one document, at ``position``."""
        pos = torch.arange(self.position, self.position + length, device=device)
        return SequenceContext(
            seq_idx=None,
            doc_pos=pos.expand(batch, length),
            offset=self.position,
            length=self.position + length,
        )

    def block_runner(self, run_block: RunBlock) -> RunBlock:
        """``run_block`` that hands each path of each block run its state (a stack's forward
        calls it once per run, in the same order every call)."""
        runs: dict[str, int] = {}

        def run(name: str, h: torch.Tensor, context: SequenceContext, **extra: Any) -> Any:
            index = runs.get(name, 0)
            runs[name] = index + 1
            states = self.states.get((name, index))
            if states is None:
                raise ValueError(f"the cache has no state for run {index} of block {name!r}")
            kwargs = {path: {"cache": state} for path, state in states.items()}
            return run_block(name, h, context, path_kwargs=kwargs, **extra)

        return run

    def nbytes(self) -> dict[str, int]:
        """Bytes of every tensor of the state per path name (summed over block runs) and
        "total"; the bytes of all rows (divide by the batch for one sequence)."""
        out: dict[str, int] = {}
        for paths in self.states.values():
            for name, state in paths.items():
                out[name] = out.get(name, 0) + tensor_bytes(state)
        out["total"] = sum(out.values())
        return out


def tensor_bytes(state: Any) -> int:
    """Sum of ``nbytes`` over the tensors of a state (dataclasses, tuples and lists walked)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()  # also on the meta device
    if dataclasses.is_dataclass(state):
        return sum(tensor_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, tuple | list):
        return sum(tensor_bytes(item) for item in state)
    return 0


def tensor_shapes(state: Any) -> list[tuple[int, ...]]:
    """The shapes of a state's tensors in field order (to compare two states' layouts)."""
    if isinstance(state, torch.Tensor):
        return [tuple(state.shape)]
    if dataclasses.is_dataclass(state):
        return [s for f in dataclasses.fields(state) for s in tensor_shapes(getattr(state, f.name))]
    if isinstance(state, Iterable) and not isinstance(state, str | dict):
        return [s for item in state for s in tensor_shapes(item)]
    return []


def new_decode_cache(
    model: CausalLM,
    batch: int,
    context_len: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DecodeCache:
    """The decode cache of ``batch`` new sequences for ``model`` (at evaluation settings: a
    looped block gets a state per run of its evaluation depth).

    Args:
        model: the model to decode with.
        batch: rows decoded together.
        context_len: 0 starts decoding; N > 0 gives a cache *sized* as after N tokens whose
            contents are zeros (for measuring memory, e.g. on the meta device), not one to
            decode from.
        device: where the states live (default: the model's embedding's device).
        dtype: dtype of cached activations (default: the model's parameters'); recurrent
            states stay fp32.
    """
    weight = model.tok_embeddings.weight
    device = torch.device(device) if device is not None else weight.device
    dtype = dtype if dtype is not None else weight.dtype
    states: dict[tuple[str, int], dict[str, Any]] = {}
    for name, runs in model.stack.runs_per_forward(training=False).items():
        block = model.blocks[name]
        for index in range(int(runs)):
            paths = {}
            for path, module in block.paths.items():
                make = getattr(module, "decode_state", None)
                state = (
                    None if make is None else make(batch, context_len, device=device, dtype=dtype)
                )
                if state is not None:
                    paths[path] = state
            states[(name, index)] = paths
    return DecodeCache(position=context_len, states=states)
