"""MLflow tracking: runs, params, tags, artifacts, and a metric sink that batches off the training thread.

The training thread only appends ``(step, metrics)`` to a buffer; a background thread turns them
into ``Metric`` entities and sends them with ``log_batch`` (at most 1000 per request), so logging
never costs one HTTP request per value.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from gradsweep.tracking_uri import is_local_sqlite, mask, sqlite_path

log = logging.getLogger("gradsweep.tracking")
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for log_batch
MAX_PARAMS_PER_BATCH = 100
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "gradsweep.sweep_id"


def resolve_uri(uri: str) -> str:
    """Make a relative embedded-store path absolute and create its folder."""
    if is_local_sqlite(uri):
        path = sqlite_path(uri)
        if not path.is_absolute():
            path = Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


class Tracker:
    """One tracking store (embedded sqlite or a server) and one experiment in it."""

    def __init__(self, uri: str, experiment_name: str, artifact_location: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment_name, artifact_location)

    def _experiment(self, name: str, artifact_location: Optional[str]) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if artifact_location is None and is_local_sqlite(self.uri):
            artifact_location = (sqlite_path(self.uri).parent / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # created concurrently by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str] = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def metric_sink(self, run_id: str, flush_every_s: float = 1.0) -> "MetricSender":
        return MetricSender(self.client, run_id, flush_every_s)

    def children(self, parent_run_id: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10000, order_by=["attributes.start_time ASC"])

    def history(self, run_id: str, key: str) -> tuple[list[int], list[float]]:
        points = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.step for m in points], [m.value for m in points]

    def __repr__(self) -> str:
        return f"Tracker({mask(self.uri)!r}, experiment {self.experiment_id})"


class MetricSender:
    """A :class:`~gradsweep.sinks.Sink` that sends metrics from a background thread with ``log_batch``.

    A failed request is kept and retried on the next wake-up, so a short outage loses nothing.
    :meth:`close` sends everything left before returning.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every_s: float = 1.0):
        self.client, self.run_id, self.flush_every_s = client, run_id, flush_every_s
        self._buffer: deque[tuple[int, int, dict[str, float]]] = deque()
        self._pending: list[Metric] = []  # built but not yet delivered (retried first)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self.sent = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._loop, name="gradsweep-metrics", daemon=True)
        self._thread.start()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._buffer.append((step, int(time.time() * 1000), metrics))
        if len(self._buffer) * max(len(metrics), 1) >= MAX_METRICS_PER_BATCH:
            self._wake.set()

    def _drain(self) -> None:
        while self._buffer:
            step, ts, metrics = self._buffer.popleft()
            self._pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def _send(self) -> bool:
        """Deliver pending metrics in chunks; return False if the store could not be reached."""
        self._drain()
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:  # keep the chunk; retry on the next wake-up
                if not self._failing:
                    log.warning("metric logging failed, will retry: %s", str(e).splitlines()[0][:200])
                self._failing = True
                return False
            if self._failing:
                log.warning("metric logging recovered")
            self._failing = False
            del self._pending[:len(chunk)]
            self.sent += len(chunk)
            self.requests += 1
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self._send()

    def close(self, timeout_s: float = 120.0) -> None:
        """Stop the thread and deliver what is left (retrying until ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + timeout_s
        while not self._send():
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not deliver {len(self._pending)} metrics to the tracking store")
            time.sleep(1.0)

    def unsent(self) -> int:
        return len(self._pending) + sum(len(m) for _, _, m in self._buffer)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

