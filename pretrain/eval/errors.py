"""The error of the evaluation package."""

from __future__ import annotations


class EvalError(RuntimeError):
    """An evaluation that cannot run: no usable checkpoint, an unknown task, unreadable data.

    The message names the path, step or task; the command line prints it and exits with 2.
    """
