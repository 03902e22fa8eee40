"""Choosing the tracker for this process: MLflow on rank 0, nothing elsewhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from launch.tracking.base import NullTracker, Tracker
from launch.tracking.mlflow_tracker import MlflowTracker, first_line
from launch.tracking.session import MlflowSession
from launch.tracking.sqlite_store import (
    ARTIFACTS_DIR,
    STORE_FILE,
    prepare_sqlite_store,
    relocate_artifacts,
    sqlite_path,
)
from pretrain.history import METRICS_FILE

logger = logging.getLogger("launch.tracking")

# MLflow's defaults (120 s timeout, 7 retries with backoff 2) hold one request to a dead server
# for minutes; the tracking thread retries with its own backoff, so one short attempt per
# request is enough (and urllib3 then logs no warning per retry). Values the user exported win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
}
_REMOTE_SCHEMES = ("http", "https", "databricks", "uc", "databricks-uc")


def resolve_tracking_uri(run_dir: Path, tracking_uri: str | None = None) -> str:
    """The store a run logs to: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<run_dir>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(run_dir).resolve() / STORE_FILE).as_posix()}"


def is_remote_uri(uri: str) -> bool:
    """Whether the store is reached over HTTP (a server) rather than a local file or database."""
    return uri.partition(":")[0].lower() in _REMOTE_SCHEMES


def apply_http_defaults() -> dict[str, str]:
    """Set short MLflow HTTP timeouts/retries where the user has not set them.

    Returns:
        The variables this call set (process-wide: MLflow reads them per request).
    """
    applied = {k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ}
    os.environ.update(applied)
    return applied


def prepare_local_store(uri: str, run_dir: Path, artifact_root: str) -> None:
    """Create or repair a SQLite store now, before training (a kill then cannot half-create it),
    and follow a moved run directory; never raises: the tracking thread retries and warns."""
    db = sqlite_path(uri)
    if db is None:
        return
    try:
        prepare_sqlite_store(uri, artifact_root)
        if db.resolve() == run_dir / STORE_FILE:  # the run directory's own store
            relocate_artifacts(db, run_dir)
    except ImportError:
        return  # no sqlalchemy: the tracking thread disables tracking with its own warning
    except Exception as exc:
        logger.warning(
            "MLflow store %s could not be prepared (%s: %s); training continues, tracking retries",
            db,
            type(exc).__name__,
            first_line(exc),
        )


def build_tracker(
    enabled: bool,
    run_dir: Path,
    experiment: str,
    run_name: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    is_main_process: bool = True,
    system_metrics: bool = True,
    *,
    flush_interval_s: float = 2.0,
    close_timeout_s: float = 15.0,
    max_buffered: int = 100_000,
    attach: bool = False,
) -> Tracker:
    """Build the tracker for this process; never raises because of the tracking store.

    Args:
        enabled: tracking switched on in the config.
        run_dir: the run directory; the default store and artifacts live there
            (``mlflow.db``, ``mlartifacts/``). A SQLite store is created, repaired or re-pointed
            at a moved run directory before this returns (``prepare_local_store``).
        experiment: MLflow experiment name (created when missing).
        run_name: name of a new MLflow run.
        run_id: the run to continue on resume (from the checkpoint), or None for a new run.
        tracking_uri: overrides ``$MLFLOW_TRACKING_URI`` and the SQLite default.
        is_main_process: only rank 0 tracks; other ranks get a no-op tracker and write nothing.
        system_metrics: log CPU/memory/disk/network (and GPU with pynvml) when psutil is there.
        flush_interval_s: how often the background thread sends a batch.
        close_timeout_s: the most ``close()`` waits for the final flush.
        max_buffered: metric points kept while the store is unreachable (oldest dropped).
        attach: only add to the existing run ``run_id`` and leave its status as it is
            (``MlflowSession``'s ``attach``; ``hydra-pretrain eval --mlflow``).

    Returns:
        A :class:`MlflowTracker` on the main process when enabled, else a :class:`NullTracker`
        that keeps ``run_id``.
    """
    if not (enabled and is_main_process):
        return NullTracker(run_id)
    try:
        import mlflow  # noqa: F401  (imported here, not in the tracking thread)
    except Exception as exc:
        logger.warning("MLflow not importable (%s); training continues without tracking", exc)
        return NullTracker(run_id)
    run_dir = Path(run_dir).resolve()
    uri = resolve_tracking_uri(run_dir, tracking_uri)
    if is_remote_uri(uri):
        apply_http_defaults()
        artifact_location = None  # the server decides where artifacts go
    else:
        artifact_location = (run_dir / ARTIFACTS_DIR).as_uri()
        prepare_local_store(uri, run_dir, artifact_location)
    session = MlflowSession(
        tracking_uri=uri,
        experiment=experiment,
        run_name=run_name,
        artifact_location=artifact_location,
        resume_run_id=run_id,
        tags={"run_dir": str(run_dir)},
        system_metrics=system_metrics,
        attach=attach,
    )
    return MlflowTracker(
        session,
        flush_interval_s=flush_interval_s,
        close_timeout_s=close_timeout_s,
        max_buffered=max_buffered,
        history_path=run_dir / METRICS_FILE,
    )
