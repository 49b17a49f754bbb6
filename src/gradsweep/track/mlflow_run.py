"""The ``mlflow`` backend of the run-logger seam: a run opened for writing (:func:`open_run`) and
written through a :class:`~gradsweep.track.journal.RunJournal` on local disk (:class:`MlflowRun`).

A delivery process (:mod:`gradsweep.track.delivery`, started by :mod:`gradsweep.track.worker`)
sends the journal to the store with ``log_batch`` (up to 1000 metrics per request): the training
thread never waits on the store and never sends one request per value, and a store that is down at
start or mid-run only delays delivery.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

from gradsweep.errors import RecordingLost
from gradsweep.names import WORKER_TAG
from gradsweep.track import delivery
from gradsweep.track.hooks import hook_target, preload_modules
from gradsweep.track.closing import close_run, fail_on_store
from gradsweep.track.create import new_key
from gradsweep.track.journal import STATE, RunJournal, default_spool_dir, now_ms, read_json, worker_id
from gradsweep.track.settings import TrackingConfig
from gradsweep.track.tracker import Tracker, default_artifact_location, resolve_uri
from gradsweep.track.uri import mask
from gradsweep.track.worker import DeliveryWorker, mlflow_loaded


class MlflowRun:
    """The ``mlflow`` backend of the run-logger seam (:class:`~gradsweep.track.logger.RunLogger`):
    records go to the run's journal; :meth:`finish` writes the status and delivers what is left."""

    def __init__(self, journal: RunJournal, timeout_s: float, run_name: str = "", deferred: bool = False) -> None:
        self.journal = journal
        self.timeout_s = timeout_s
        self.run_name = run_name
        #: the run's parent delivers it (a child of a sweep whose parent journal is in this spool: the
        #: parent's summary hook delivers its children first, and the sweep waits for the parent), so
        #: the job ends without waiting and the next job of the sweep starts at once
        self.deferred = deferred

    @property
    def run_id(self) -> Optional[str]:
        return self.journal.run_id

    @property
    def local_id(self) -> str:
        return self.journal.local_id

    @property
    def run_ref(self) -> str:
        """The run's id once it exists on the store (its delivery process creates it), else its name."""
        return self.journal.run_id or self.run_name or f"(spooled {self.journal.local_id})"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.journal.log_metrics(step, metrics)

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        self.journal.define_steps(names, total_steps)

    def log_steps(self, steps, values) -> None:
        self.journal.log_steps(steps, values)

    def log_params(self, params: dict[str, Any]) -> None:
        self.journal.log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.journal.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, move: bool = False) -> None:
        self.journal.log_artifact(path, artifact_path, move)

    def after_delivery(self, hook: Callable[..., Any], **kwargs: Any) -> None:
        """See :meth:`RunJournal.after_delivery`; the result is in :meth:`hook_result` once delivered."""
        self.journal.after_delivery(hook, **kwargs)

    def hook_result(self, hook: Callable[..., Any]) -> Optional[dict[str, Any]]:
        return ((read_json(self.journal.folder / STATE) or {}).get("hooks") or {}).get(hook_target(hook))

    def finish(self, status: str) -> bool:
        return close_run(self.journal, status, self.timeout_s, wait=not self.deferred)


def open_run(tracking: TrackingConfig, run_name: str, tags: dict[str, str], *,
             parent_run_id: Optional[str] = None, parent_local_id: Optional[str] = None,
             run_id: Optional[str] = None, create_now: bool = False,
             hooks: tuple[Callable[..., Any], ...] = ()) -> MlflowRun:
    """Open a run for writing. The run is created on the store now (``create_now``, or when this
    process has MLflow already, as a sweep's does) if the store can be reached; else by the delivery
    worker, which also does it for a single job so that its training process never imports MLflow
    (the journal then starts with what is needed to create it). ``hooks``: the delivery hooks the
    run will ask for at its end (its delivery process loads what they need meanwhile)."""
    uri = resolve_uri(tracking.uri)
    experiment_name, artifact_location = tracking.experiment_name, tracking.artifact_location
    spool = spool_of(tracking)
    tags = {**tags, WORKER_TAG: worker_id()}
    existing = run_id is not None
    key = new_key()  # the same key wherever the run is created: this process or its delivery process
    header: dict[str, Any] = {"uri": uri, "experiment_name": experiment_name,
                              "artifact_location": artifact_location or default_artifact_location(uri),
                              "max_points": tracking.max_points, "max_param_points": tracking.max_param_points,
                              "param_groups": tracking.param_groups}
    tried = False
    if run_id is None and parent_local_id is None and (create_now or mlflow_loaded()):
        try:
            tried = True  # from here on, the store may hold the run whatever the answer
            run_id = Tracker(uri, experiment_name, artifact_location).start_run(run_name, tags, parent_run_id, key)
        except Exception as e:
            if not delivery.is_transient(e):
                raise
            print(f"[gradsweep] tracking store {mask(uri)} unreachable; the run is spooled to {spool} "
                  "and created there when it answers", file=sys.stderr, flush=True)
    if hooks:  # what they import, imported by the delivery process while it waits
        header["preload"] = preload_modules(hooks)
    if parent_run_id or parent_local_id:  # so a hook of the parent finds its children's journals
        header.update(parent_run_id=parent_run_id, parent_local_id=parent_local_id)
    if not existing:
        header["create_key"] = key
    if run_id:
        header["run_id"] = run_id
    else:
        header["create"] = {"run_name": run_name, "tags": tags, "parent_run_id": parent_run_id,
                            "parent_local_id": parent_local_id, "start_time": now_ms(), "tried": tried}
    try:
        journal = RunJournal.create(spool, header)
    except RecordingLost as e:
        if run_id and not existing:  # created on the store a moment ago: not left RUNNING there
            fail_on_store(uri, run_id, "journal_unwritable", str(e))
        raise
    if existing:  # a resumed run: it is this process's now (see ownership.close_dead_runs)
        journal.set_tags({WORKER_TAG: tags[WORKER_TAG]})
    DeliveryWorker.ensure(spool, uri)
    DeliveryWorker.nudge(spool)  # a new journal: its run is created now, not at the next look
    return MlflowRun(journal, tracking.delivery_timeout_s, run_name, deferred=parent_local_id is not None)


def spool_of(tracking: TrackingConfig) -> Path:
    """Where runs of ``tracking`` are journaled before delivery."""
    return Path(tracking.spool_dir) if tracking.spool_dir else default_spool_dir(resolve_uri(tracking.uri))
