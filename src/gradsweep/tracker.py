"""MLflow tracking: the store and experiment (:class:`Tracker`), and opening a run's journal.

Runs are written through a :class:`~gradsweep.spool.RunJournal` on local disk and delivered by a
worker process (:mod:`gradsweep.delivery`) with ``log_batch`` (up to 1000 metrics per request):
the training thread never waits on the store and never sends one request per value, and a
store that is down at start or mid-run only delays delivery.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

# Fail fast: MLflow's default (7 retries, exponential backoff) blocks a call for minutes when the
# server is down. We retry ourselves, with the data safe in the journal meanwhile.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
# MLflow prints a "View run at <uri>" line per run; the URI may carry a password, and we print our own.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow.tracking import MlflowClient  # noqa: E402

from gradsweep import delivery  # noqa: E402
from gradsweep.spool import RunJournal, default_spool_dir, now_ms  # noqa: E402
from gradsweep.tracking_uri import is_local_sqlite, mask, sqlite_path  # noqa: E402

log = logging.getLogger("gradsweep.tracking")
PARENT_TAG = "mlflow.parentRunId"
WORKER_TAG = "gradsweep.worker"  # host:pid of the process writing the run
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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: str) -> bool:
    """False only when the worker ran on this host and its process is gone."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(tracker: "Tracker") -> list[str]:
    """Runs left RUNNING by a process of this host that no longer exists (SIGKILL, a crash):
    closed KILLED with tag ``failure=worker_died``, so a restarted sweep leaves nothing RUNNING."""
    closed = []
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                      max_results=1000)
    for run in runs:
        worker = run.data.tags.get(WORKER_TAG)
        if worker and not worker_alive(worker):
            tracker.client.set_tag(run.info.run_id, "failure", "worker_died")
            tracker.client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d run(s) left RUNNING by dead processes as KILLED", len(closed))
    return closed


def default_artifact_location(uri: str) -> Optional[str]:
    """Embedded store: ``mlruns/artifacts`` beside the database. A server decides for itself."""
    return (sqlite_path(uri).parent / "artifacts").as_uri() if is_local_sqlite(uri) else None


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
        artifact_location = artifact_location or default_artifact_location(self.uri)
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

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def children(self, parent_run_id: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=10000, order_by=["attributes.start_time ASC"])

    def history(self, run_id: str, key: str) -> tuple[list[int], list[float]]:
        points = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.step for m in points], [m.value for m in points]

    def __repr__(self) -> str:
        return f"Tracker({mask(self.uri)!r}, experiment {self.experiment_id})"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out



# ------------------------------------------------------------------------------ run journals
def open_run(uri: str, experiment_name: str, run_name: str, tags: dict[str, str], *,
             artifact_location: Optional[str] = None, spool_dir: Optional[str] = None,
             parent_run_id: Optional[str] = None, parent_local_id: Optional[str] = None,
             run_id: Optional[str] = None) -> RunJournal:
    """Open a run for writing. The run is created on the store now if it can be reached, else
    later by the delivery worker (the journal then starts with what is needed to create it)."""
    uri = resolve_uri(uri)
    spool = Path(spool_dir) if spool_dir else default_spool_dir(uri)
    tags = {**tags, WORKER_TAG: worker_id()}
    existing = run_id is not None
    header: dict[str, Any] = {"uri": uri, "experiment_name": experiment_name,
                              "artifact_location": artifact_location or default_artifact_location(uri)}
    if run_id is None and parent_local_id is None:
        try:
            run_id = Tracker(uri, experiment_name, artifact_location).start_run(run_name, tags, parent_run_id)
        except Exception as e:
            if not delivery.is_transient(e):
                raise
            print(f"[gradsweep] tracking store {mask(uri)} unreachable; the run is spooled to {spool} "
                  "and created there when it answers", file=sys.stderr, flush=True)
    if run_id:
        header["run_id"] = run_id
    else:
        header["create"] = {"run_name": run_name, "tags": tags, "parent_run_id": parent_run_id,
                            "parent_local_id": parent_local_id, "start_time": now_ms()}
    journal = RunJournal.create(spool, header)
    if existing:  # a resumed run: it is this process's now (see close_dead_runs)
        journal.set_tags({WORKER_TAG: tags[WORKER_TAG]})
    DeliveryWorker.ensure(spool)
    return journal


def close_run(journal: RunJournal, status: str, timeout_s: float = 60.0) -> bool:
    """Write the final status and deliver what is left. False if the store stayed unreachable:
    the journal stays on disk for ``gradsweep sync``."""
    journal.end(status)
    reporter = delivery.OutageReporter()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if delivery.deliver(journal.folder, wait_s=30):
                reporter.reachable()
                return True
        except delivery.Busy:
            continue
        except delivery.Unreachable as e:
            reporter.unreachable(journal.folder.parent, str(e))
        if time.monotonic() > deadline:
            print(f"[gradsweep] run not fully delivered; it stays in {journal.folder.parent}: "
                  "run `gradsweep sync` when the tracking store is back", file=sys.stderr, flush=True)
            return False
        time.sleep(1.0)


class DeliveryWorker:
    """One delivery process per training process and spool folder (see :mod:`gradsweep.delivery`).

    It stops when this process closes its stdin pipe, i.e. also when this process dies."""

    _workers: dict[Path, subprocess.Popen] = {}

    @classmethod
    def ensure(cls, spool: Path) -> None:
        spool = spool.resolve()
        proc = cls._workers.get(spool)
        if proc is not None and proc.poll() is None:
            return
        src = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        cls._workers[spool] = subprocess.Popen(
            [sys.executable, "-m", "gradsweep.delivery", str(spool), "--owner-pid", str(os.getpid())],
            stdin=subprocess.PIPE, env=env, start_new_session=True)
