"""Experiment tracking (MLflow) for rank 0 that never blocks or kills training.

``build_tracker`` returns a :class:`Tracker`; see ``docs/tracking.md`` for where runs go and how
a resumed run continues the same MLflow run.
"""

from launch.tracking.base import NullTracker, Tracker
from launch.tracking.build import build_tracker, resolve_tracking_uri
from launch.tracking.mlflow_tracker import MlflowTracker
from launch.tracking.params import flatten_config, sanitize_key

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "build_tracker",
    "flatten_config",
    "resolve_tracking_uri",
    "sanitize_key",
]
