"""The tracking store, read and written directly: the store and experiment (:class:`Tracker`), a
run's metric history, and :class:`StoreRun` for code that writes to a run already on the store.

Training never writes through these: its runs go through a journal (:mod:`gradsweep.track.mlflow_run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gradsweep.names import PARENT_TAG
from gradsweep.track import delivery
from gradsweep.track.create import create_run_once, new_key
from gradsweep.track.journal import now_ms
from gradsweep.track.uri import absolute_sqlite, is_local_sqlite, mask, sqlite_path

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from gradsweep.track.history import Histories


def resolve_uri(uri: str) -> str:
    """Make a relative embedded-store path absolute and create its folder."""
    return absolute_sqlite(uri, create=True)


def default_artifact_location(uri: str) -> Optional[str]:
    """Embedded store: ``mlruns/artifacts`` beside the database. A server decides for itself."""
    return (sqlite_path(uri).parent / "artifacts").as_uri() if is_local_sqlite(uri) else None


def metric_history(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric of one run, in step order."""
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


class Tracker:
    """One tracking store (embedded sqlite or a server) and one experiment in it."""

    def __init__(self, uri: str, experiment_name: str, artifact_location: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.client = delivery.mlflow_client(self.uri)
        self.experiment_id = self._experiment(experiment_name, artifact_location)
        self._histories: Optional[Histories] = None

    def _experiment(self, name: str, artifact_location: Optional[str]) -> str:
        return delivery.experiment_id(self.client, name, artifact_location or default_artifact_location(self.uri))

    def start_run(self, run_name: str, tags: dict[str, str], parent_run_id: Optional[str] = None,
                  key: Optional[str] = None) -> str:
        """Create a run, once however often its request is sent (``key``: see :mod:`gradsweep.track.create`)."""
        tags = dict(tags)
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        return create_run_once(self.client, self.experiment_id, key or new_key(), run_name=run_name, tags=tags)

    def children(self, parent_run_id: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10000, order_by=["attributes.start_time ASC"])

    def history(self, run_id: str, key: str) -> tuple[list[int], list[float]]:
        """Every step of a run's metric: its dense history where it has the key, else MLflow's."""
        if self._histories is None:
            from gradsweep.track.history import Histories

            self._histories = Histories(self.client)
        return self._histories.series(run_id, key)

    def __repr__(self) -> str:
        return f"Tracker({mask(self.uri)!r}, experiment {self.experiment_id})"


class StoreRun:
    """Writes straight to an existing run on the store (for delivery hooks, which run where MLflow
    is loaded and the run's journal is being delivered)."""

    def __init__(self, client: "MlflowClient", run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now_ms(), step) for k, v in metrics.items()])
