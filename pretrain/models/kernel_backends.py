"""Point every kernel-calling module of a model at the backends chosen by ``kernels.backends``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from kernels.backends import BACKENDS


def apply_kernel_backends(model: nn.Module, backends: Mapping[str, str]) -> None:
    """Set ``kernel_backend`` on every submodule whose class declares a ``kernel_op``.

    Call it with the result of ``kernels.backends.select_backends`` (concrete names, no ``auto``),
    after building the model and before compiling or wrapping it; ops absent from ``backends``
    keep their current backend (``torch`` by default).

    Args:
        model: the model (any ``nn.Module``; it is walked with ``modules()``).
        backends: op -> backend, e.g. ``{"ssd": "triton", "moe": "grouped_mm"}``.

    Raises:
        ValueError: an unknown op, or a backend that is not one of the op's backends (``auto``
            included: resolve it with ``select_backends`` first).
    """
    for op, backend in backends.items():
        if op not in BACKENDS:
            raise ValueError(f"unknown kernel op '{op}'; known: {list(BACKENDS)}")
        if backend not in BACKENDS[op]:
            raise ValueError(
                f"backend '{backend}' for op '{op}' is not one of {list(BACKENDS[op])}"
                " (resolve 'auto' with kernels.backends.select_backends first)"
            )
    for module in model.modules():
        op = getattr(type(module), "kernel_op", None)
        if op in backends:
            module.kernel_backend = backends[op]
