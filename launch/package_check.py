"""Fail clearly when another installed distribution shadows one of our top-level packages.

``kernels`` and ``parallel`` are also names of unrelated PyPI packages; if one of those is
imported instead of ours, errors would surface far from the cause.
"""

from __future__ import annotations

import importlib
from pathlib import Path

OWN_PACKAGES = ("pretrain", "parallel", "kernels", "data_pipeline", "launch")


def check_own_packages() -> None:
    """Raise ImportError naming any top-level package that resolves outside this distribution."""
    root = Path(__file__).resolve().parent.parent
    wrong = []
    for name in OWN_PACKAGES:
        module = importlib.import_module(name)
        origin = Path(getattr(module, "__file__", "") or "").resolve()
        if root not in origin.parents:
            wrong.append(f"'{name}' resolves to {origin or '<namespace>'}")
    if wrong:
        raise ImportError(
            "another installed package shadows hydra-pretrain's packages: "
            + "; ".join(wrong)
            + f". Expected them under {root}. Uninstall the other package or use a clean venv."
        )
