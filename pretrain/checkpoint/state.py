"""Per-rank state beside the tensors: RNG states and the ``extra`` dict (serialised so that it
loads with ``weights_only=True``)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


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
