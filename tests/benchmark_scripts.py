"""Load a ``benchmarks/*.py`` script as a module in a test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(filename: str) -> ModuleType:
    """Import ``benchmarks/<filename>`` by path: ``benchmarks`` is no installed package, and a
    script named ``kernels.py`` must not shadow the project's ``kernels`` package."""
    name = f"{Path(filename).stem}_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]
