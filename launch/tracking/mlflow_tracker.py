"""MLflow tracking that never blocks or kills training.

The training thread only formats and appends to a bounded buffer; one daemon thread creates (or
continues) the run and sends batches with ``MlflowClient.log_batch``. When the store fails, the
thread warns once, keeps the data buffered (dropping the oldest metrics past the bound) and
retries with backoff; it warns once more when the store answers again. ``close()`` waits for the
flush at most ``close_timeout_s`` seconds, and names in one warning what the store never got.

On resume the trainer hands over the recorded history (``log_history``): before live points, the
thread sends every recorded point the run lacks, so a hard kill that lost buffered points leaves
no hole once the run resumes.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from launch.tracking.backlog import HistoryBacklog
from launch.tracking.buffer import ArtifactItem, MetricPoint, TrackingBuffer
from launch.tracking.params import flatten_config, sanitize_key
from launch.tracking.session import (
    MAX_METRICS_PER_BATCH,
    MlflowSession,
    RunNotFound,
    is_permanent,
)

logger = logging.getLogger("launch.tracking")

_MIN_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 30.0
_CLOSING_RETRY_S = 0.5


class TrackingDisabled(Exception):
    """The store can never work in this process (e.g. its driver is not installed)."""


class MlflowTracker:
    """A :class:`~launch.tracking.base.Tracker` backed by MLflow, asynchronous and buffered.

    Args:
        session: the MLflow side (store, experiment, run to continue).
        flush_interval_s: how long the tracking thread gathers metrics before a batch (it also
            wakes when a full batch is waiting).
        close_timeout_s: the most ``close()`` waits for the last flush.
        max_buffered: the most metric points held while the store is unreachable.
        history_path: the file that records every logged point (``metrics.jsonl``), named when
            points could not be sent.
    """

    def __init__(
        self,
        session: MlflowSession,
        flush_interval_s: float = 2.0,
        close_timeout_s: float = 15.0,
        max_buffered: int = 100_000,
        history_path: Path | None = None,
    ) -> None:
        self._session = session
        self._buffer = TrackingBuffer(max_buffered)
        self._backlog = HistoryBacklog()
        self._history_path = history_path
        self._flush_interval_s = flush_interval_s
        self._close_timeout_s = close_timeout_s
        self._lock = threading.Lock()
        self._run_id = session.resume_run_id
        self._run_ready = threading.Event()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._close_status = "FINISHED"
        self._deadline = math.inf
        self._closed = False
        self._disabled = False
        self._healthy = True
        self._drop_warned = False  # one warning per outage
        self._drops_reported = 0  # dropped points already named in a warning
        self._warned_values: set[str] = set()
        self._key_cache: dict[str, str] = {}
        self._inflight: list[MetricPoint] = []
        self.last_error: str | None = None  # the latest failure of the store, one line
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracking", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    # ------------------------------------------------------------------ training-thread side

    @property
    def run_id(self) -> str | None:
        """The run to store in checkpoints: the resumed one at once, a new one once created."""
        with self._lock:
            return self._run_id

    @property
    def dropped_metrics(self) -> int:
        """Metric points dropped because the buffer was full."""
        return self._buffer.dropped_metrics

    @property
    def disabled(self) -> bool:
        """Whether tracking was switched off for good (the store or run cannot work here)."""
        return self._disabled

    @property
    def pending_metrics(self) -> int:
        """Metric points not yet sent (history points count until their key is compared)."""
        return len(self._buffer) + len(self._inflight) + len(self._backlog)

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue a (nested) config as params with flattened dotted keys."""
        if not self._accepting():
            return
        self._buffer.add_params(flatten_config(params))
        self._wake.set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue scalar metrics at ``step``; returns at once. Pass Python floats, not tensors."""
        if not self._accepting():
            return
        now_ms = time.time_ns() // 1_000_000
        points = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._warn_value_once(key, value)
                continue
            points.append(MetricPoint(self._metric_key(key), number, now_ms, int(step)))
        if self._buffer.add_metrics(points) and not self._drop_warned:
            self._warn_first_drop()
        if len(self._buffer) >= MAX_METRICS_PER_BATCH:
            self._wake.set()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload; it must still exist when the thread sends it."""
        if not self._accepting():
            return
        if self._buffer.add_artifact(ArtifactItem(Path(path).resolve(), artifact_path)):
            logger.warning("MLflow artifact queue full; dropped the oldest pending upload")
        self._wake.set()

    def log_history(self, rows: Sequence[dict[str, float]]) -> None:
        """Queue recorded rows (each with ``step``): the thread sends, before any live point, those
        the run does not hold, reading the run's history of each key once; none is sent twice."""
        if not rows or not self._accepting():
            return
        self._backlog.add(rows)
        self._wake.set()

    def wait_for_run(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for the run to exist in the store; returns its id or None."""
        self._run_ready.wait(timeout_s)
        return self.run_id

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run as ``status``, waiting at most ``close_timeout_s``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_status = status
            self._deadline = time.monotonic() + self._close_timeout_s
        atexit.unregister(self._close_at_exit)
        self._closing.set()
        self._wake.set()
        self._thread.join(self._close_timeout_s)
        self._report_unsent()

    def _report_unsent(self) -> None:
        """One warning naming what the store never got, and where the metrics still are."""
        metrics, params, artifacts = self._buffer.counts()
        unsent = metrics + len(self._inflight) + len(self._backlog)
        dropped = self._buffer.dropped_metrics - self._drops_reported
        if not (unsent or dropped or params or artifacts):
            return
        why = (
            f"not done within close_timeout_s={self._close_timeout_s:g}"
            if self._thread.is_alive()
            else "the store failed until the end"
        )
        logger.warning(
            "MLflow unsent at close: %d metric points (and %d dropped earlier from the full"
            " buffer), %d params, %d artifacts for %s (%s); the metrics are kept in %s, and a"
            " resume of this run sends what its store lacks",
            unsent,
            dropped,
            params,
            artifacts,
            _redact(self._session.tracking_uri),
            why,
            self._history_path or "metrics.jsonl",
        )

    def _close_at_exit(self) -> None:
        # The trainer closes explicitly; reaching here means it did not finish normally.
        self.close(status="FAILED")

    def _accepting(self) -> bool:
        return not (self._closed or self._disabled)

    def _metric_key(self, key: str) -> str:
        clean = self._key_cache.get(key)
        if clean is None:
            clean = self._key_cache[key] = sanitize_key(key)
        return clean

    def _warn_value_once(self, key: str, value: Any) -> None:
        if key not in self._warned_values:
            self._warned_values.add(key)
            logger.warning("MLflow metric %r is not a number (%r); not logged", key, type(value))

    def _warn_first_drop(self) -> None:
        self._drop_warned = True
        logger.warning(
            "MLflow buffer full (%d metric points): dropping the oldest; the count is reported"
            " when the store answers again",
            self._buffer.max_metrics,
        )

    # ------------------------------------------------------------------ tracking-thread side

    def _loop(self) -> None:
        backoff = _MIN_BACKOFF_S
        while True:
            closing = self._closing.is_set()
            try:
                self._connect()
                self._drain()
                self._mark_healthy()
                backoff = _MIN_BACKOFF_S
                if closing:
                    self._session.finish(self._close_status)
                    return
            except TrackingDisabled as exc:
                self._disable(exc)
                return
            except Exception as exc:
                self._mark_unhealthy(exc)
                if closing:
                    if time.monotonic() + _CLOSING_RETRY_S >= self._deadline:
                        return
                    time.sleep(_CLOSING_RETRY_S)
                else:
                    self._closing.wait(backoff)
                    backoff = min(2 * backoff, _MAX_BACKOFF_S)
                continue
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()

    def _connect(self) -> None:
        if self._session.connected:
            return
        try:
            run_id = self._session.connect()
        except (ImportError, RunNotFound) as exc:
            raise TrackingDisabled(exc) from exc
        with self._lock:
            self._run_id = run_id
        self._run_ready.set()
        logger.info("MLflow run %s in %s", run_id, _redact(self._session.tracking_uri))

    def _drain(self) -> None:
        params = self._buffer.take_params()
        if params:
            try:
                self._session.send_params(params)
            except Exception as exc:
                if not is_permanent(exc):
                    self._buffer.restore_params(params)
                    raise
                logger.warning("MLflow rejected params (%s); dropped", exc)
        self._drain_history()  # the recorded past before the live present
        self._drain_metrics()
        self._drain_artifacts()

    def _drain_history(self) -> None:
        # A failure leaves the key in the backlog; the retry reads its history again, so a batch
        # that reached the store without an answer is not sent twice.
        while (raw_key := self._backlog.next_key()) is not None:
            key = self._metric_key(raw_key)
            values = self._backlog.values(raw_key)
            stored = self._session.stored_steps(key)
            now_ms = time.time_ns() // 1_000_000  # jsonl rows carry no time: the replay's
            missing = [MetricPoint(key, v, now_ms, s) for s, v in values.items() if s not in stored]
            for i in range(0, len(missing), MAX_METRICS_PER_BATCH):
                self._send_or_drop(missing[i : i + MAX_METRICS_PER_BATCH])
            if values:
                self._session.mark_logged(key, max(values))
            self._backlog.done(raw_key)

    def _drain_metrics(self) -> None:
        while True:
            if not self._inflight:
                taken = self._buffer.take_metrics(MAX_METRICS_PER_BATCH)
                if not taken:
                    return
                self._inflight = self._session.new_points(taken)
                if not self._inflight:
                    continue
            self._send_or_drop(self._inflight)
            self._inflight = []

    def _send_or_drop(self, points: list[MetricPoint]) -> None:
        """Send a batch; one the store rejects as invalid is dropped (retrying cannot fix it)."""
        try:
            self._session.send_metrics(points)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            logger.warning("MLflow rejected %d metric points (%s); dropped", len(points), exc)

    def _drain_artifacts(self) -> None:
        while (item := self._buffer.take_artifact()) is not None:
            try:
                self._session.send_artifact(item)
            except FileNotFoundError as exc:
                logger.warning("MLflow artifact not logged: %s", exc)
            except Exception as exc:
                if not is_permanent(exc):
                    self._buffer.add_artifact(item)
                    raise
                logger.warning("MLflow rejected artifact %s (%s); dropped", item.path, exc)

    def _mark_unhealthy(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {first_line(exc)}"
        if self._healthy:
            self._healthy = False
            logger.warning(
                "MLflow tracking store %s unreachable or failing (%s: %s); training continues,"
                " buffering up to %d metric points and retrying in the background",
                _redact(self._session.tracking_uri),
                type(exc).__name__,
                first_line(exc),
                self._buffer.max_metrics,
            )

    def _mark_healthy(self) -> None:
        if not self._healthy:
            self._healthy = True
            logger.warning(
                "MLflow tracking store %s reachable again; buffered data sent (%d metric points"
                " dropped so far while it was down)",
                _redact(self._session.tracking_uri),
                self._buffer.dropped_metrics,
            )
            self._drops_reported = self._buffer.dropped_metrics
            self._drop_warned = False

    def _disable(self, exc: Exception) -> None:
        self.last_error = first_line(exc)
        self._disabled = True
        self._run_ready.set()
        logger.warning(
            "MLflow tracking disabled: the store %s cannot be used in this environment (%s);"
            " training continues without it",
            _redact(self._session.tracking_uri),
            exc,
        )


def first_line(exc: BaseException, limit: int = 500) -> str:
    """The first line of an error's message, cut at ``limit`` characters (for one-line logs)."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else ""


def _redact(uri: str) -> str:
    """Hide user:password in a URI before it reaches a log."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
