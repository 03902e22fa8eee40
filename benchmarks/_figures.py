"""Saving a benchmark's figure the same way everywhere: laid out, its folder made, 110 dpi, closed.

Import it as ``benchmarks._figures`` with the repository root on ``sys.path`` (as the scripts
arrange it at their top).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path) -> None:
    """Write matplotlib ``fig`` to ``path`` (parent folders made) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
