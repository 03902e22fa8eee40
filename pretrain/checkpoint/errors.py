"""Exceptions and warnings of the checkpoint package."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or checkpoints exist and none of them is usable."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, truncated, unloadable) or the layout looked odd."""
