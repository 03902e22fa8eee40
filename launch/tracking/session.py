"""The MLflow side of tracking: one run in one store, driven only by the tracking thread.

Every method here may block on the network or raise; :class:`~launch.tracking.mlflow_tracker.
MlflowTracker` calls them from its background thread and turns failures into retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from launch.tracking.buffer import ArtifactItem, MetricPoint

logger = logging.getLogger("launch.tracking")

MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH

# Errors that retrying cannot fix: the request itself is wrong, so it is dropped.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"}
)


class RunNotFound(Exception):
    """An attached session's run is not in the store (retrying cannot bring it)."""


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed request should be dropped rather than retried."""
    return getattr(exc, "error_code", None) in _PERMANENT_ERROR_CODES


def _default_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowSession:
    """Creates or continues one MLflow run and logs to it.

    Args:
        tracking_uri: the store (``sqlite:///...``, ``http://...``, ...).
        experiment: experiment name for a new run.
        run_name: name of a new run.
        artifact_location: artifact root for a newly created experiment (``None``: the store's
            default, which is what a remote server wants).
        resume_run_id: a run to continue; if the store does not know it, a new run is created.
        tags: tags set on a new run.
        system_metrics: start MLflow's system-metrics sampler (needs psutil) on the run.
        client_factory: builds the client from the URI (a seam for tests).
        attach: add to ``resume_run_id`` only (``hydra-pretrain eval --mlflow``): a run the
            store lacks is a ``RunNotFound`` error instead of a new run, the run's status is
            left as it is (its training may still be going), and every point is sent.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        artifact_location: str | None = None,
        resume_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        system_metrics: bool = False,
        client_factory: Callable[[str], Any] | None = None,
        attach: bool = False,
    ) -> None:
        self.attach = attach
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.resume_run_id = resume_run_id
        self.tags = dict(tags or {})
        self.system_metrics = system_metrics
        self._client_factory = client_factory or _default_client
        self.client: Any = None
        self.run_id: str | None = None
        self.resumed = False
        # Highest step already in the store, per metric key: the duplicate filter.
        self.last_steps: dict[str, int] = {}
        self.logged_params: dict[str, str] = {}
        self._monitor: Any = None

    @property
    def connected(self) -> bool:
        return self.run_id is not None

    def connect(self) -> str:
        """Create the client, then continue ``resume_run_id`` or create a run; idempotent.

        Returns:
            The run id.
        """
        if self.run_id is not None:
            return self.run_id
        if self.client is None:
            self.client = self._client_factory(self.tracking_uri)
        run_id = self._continue_run() if self.resume_run_id else None
        if run_id is None:
            run_id = self._create_run()
        self.run_id = run_id
        self._maybe_start_system_metrics()
        return run_id

    def _continue_run(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(self.resume_run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            if self.attach:
                raise RunNotFound(f"MLflow run {self.resume_run_id} is not in the store") from exc
            logger.warning(
                "MLflow run %s not found in %s; starting a new run",
                self.resume_run_id,
                self.tracking_uri,
            )
            return None
        if self.attach:
            self.resumed = True
            return run.info.run_id
        if run.info.lifecycle_stage == "deleted":
            self.client.restore_run(run.info.run_id)
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.last_steps = self._last_steps(run)
        self.logged_params = dict(run.data.params)
        self.resumed = True
        return run.info.run_id

    def _last_steps(self, run: Any) -> dict[str, int]:
        # The run's latest metrics carry the largest step per key (what MLflow's own
        # system-metrics resume reads); the full history is the public fallback.
        latest = getattr(run.data, "_metric_objs", None)
        if latest is not None:
            return {m.key: int(m.step) for m in latest}
        steps: dict[str, int] = {}
        for key in run.data.metrics:
            history = self.client.get_metric_history(run.info.run_id, key)
            steps[key] = max((int(m.step) for m in history), default=-1)
        return steps

    def _create_run(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            from mlflow.exceptions import MlflowException

            try:
                exp_id = self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location
                )
            except MlflowException as exc:  # created meanwhile by another run
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp_id = self.client.get_experiment_by_name(self.experiment).experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp_id)
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
        self.last_steps = {}
        self.logged_params = {}
        self.resumed = False
        return run.info.run_id

    def _maybe_start_system_metrics(self) -> None:
        if not self.system_metrics or self._monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=self.tracking_uri
            )
            monitor.start()
        except Exception as exc:  # psutil missing, no permission to read counters, ...
            logger.info("MLflow system metrics unavailable (%s); continuing without them", exc)
            self.system_metrics = False
            return
        self._monitor = monitor

    def new_points(self, points: Iterable[MetricPoint]) -> list[MetricPoint]:
        """Keep only points whose step is above the last one logged for their key.

        A resumed trainer replays the steps between its checkpoint and the crash, and a rollback
        replays steps too: the first value logged for a (key, step) is kept, later ones dropped.
        """
        kept = []
        for p in points:
            if p.step > self.last_steps.get(p.key, -1):
                self.last_steps[p.key] = p.step
                kept.append(p)
        return kept

    def stored_steps(self, key: str) -> set[int]:
        """The steps at which the run holds ``key``: its whole history, read once per resume."""
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, key)}

    def mark_logged(self, key: str, step: int) -> None:
        """Count ``key`` as logged up to ``step``: later live points at or below it are replays."""
        self.last_steps[key] = max(step, self.last_steps.get(key, -1))

    def send_params(self, params: dict[str, str]) -> None:
        """Log params MLflow does not hold yet; a changed value keeps the first one, warned."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if self.logged_params.get(k, v) != v)
        if changed:
            logger.warning(
                "MLflow params cannot change within a run; keeping the logged values of %s",
                ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""),
            )
        new = [Param(k, v) for k, v in params.items() if k not in self.logged_params]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            chunk = new[i : i + MAX_PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)
            self.logged_params.update((p.key, p.value) for p in chunk)

    def send_metrics(self, points: list[MetricPoint]) -> None:
        """Log up to 1000 metric points in one request."""
        from mlflow.entities import Metric

        metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def send_artifact(self, item: ArtifactItem) -> None:
        """Upload a file or a directory; raises FileNotFoundError if it is gone."""
        if item.path.is_dir():
            self.client.log_artifacts(self.run_id, str(item.path), item.artifact_path)
        elif item.path.is_file():
            self.client.log_artifact(self.run_id, str(item.path), item.artifact_path)
        else:
            raise FileNotFoundError(f"artifact {item.path} no longer exists")

    def stop_system_metrics(self) -> None:
        """Stop the sampler and flush what it holds (its own thread; may block on the store)."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()

    def finish(self, status: str) -> None:
        """Stop the system metrics and mark the run ``status`` (FINISHED, FAILED, KILLED)."""
        self.stop_system_metrics()
        if self.run_id is not None and not self.attach:
            self.client.set_terminated(self.run_id, status=status)
