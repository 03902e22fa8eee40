"""What goes into a checkpoint besides the file layout: model+optimizer as a DCP ``Stateful``,
RNG states, and the per-rank ``extra`` dict (serialised so it loads with ``weights_only=True``)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelOptimizerState(Stateful):
    """Model and optimizer state for DCP, keyed by parameter names (FQNs).

    ``get_state_dict``/``set_state_dict`` give sharded DTensors for FSDP2 models and plain tensors
    otherwise; both are keyed by FQN (wrapper prefixes such as ``_orig_mod.`` removed), so DCP can
    load a checkpoint into another world size or between sharded and unsharded models. The
    optimizer state is flattened (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``), which keeps
    it independent of parameter order and sharding.

    Args:
        model: the unwrapped model (FSDP2-sharded in place, or plain).
        optimizer: its optimizer, or None to checkpoint the model alone.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
            return
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, this rank's CUDA device, Python ``random``, NumPy.

    Only the current CUDA device is read: ``get_rng_state_all`` would create a context on every
    GPU of the node from every rank. Plain containers and tensors only, so the result loads with
    ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        state["cuda"] = {"device": device, "state": torch.cuda.get_rng_state(device)}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng_state`` returned (the CUDA part onto the current device)."""
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    keys = np.asarray(npy["keys"], dtype=np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"]["state"], torch.cuda.current_device())


def serialize_extra(extra: dict[str, Any]) -> bytes:
    """``torch.save`` bytes of ``extra``, checked to load back with ``weights_only=True``.

    Checking at save time turns "this checkpoint can never be loaded" into an error now, where
    the offending value is easy to find, instead of at resume time.

    Raises:
        TypeError: ``extra`` holds something the safe unpickler refuses (e.g. a NumPy array or an
            arbitrary object); convert it to lists, numbers, strings or tensors.
    """
    buffer = io.BytesIO()
    torch.save(extra, buffer)
    data = buffer.getvalue()
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:
        raise TypeError(
            "checkpoint extra state must hold only dicts, lists, tuples, numbers, strings, None"
            f" and tensors (it must load with torch.load(weights_only=True)): {exc}"
        ) from exc
    return data


def load_extra(path: Path) -> Any:
    return torch.load(path, weights_only=True, map_location="cpu")
