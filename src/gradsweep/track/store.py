"""MLflow tracking: the store and experiment (:class:`Tracker`), and opening a run's journal.

Runs are written through a :class:`~gradsweep.track.journal.RunJournal` on local disk and delivered by a
worker process (:mod:`gradsweep.track.delivery`) with ``log_batch`` (up to 1000 metrics per request):
the training thread never waits on the store and never sends one request per value, and a
store that is down at start or mid-run only delays delivery.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional

from gradsweep.errors import RecordingLost
from gradsweep.names import FAILURE_REASON_TAG, FAILURE_TAG, PARENT_TAG, WORKER_TAG
from gradsweep.paths import SRC
from gradsweep.track import delivery
from gradsweep.track.create import create_run_once, new_key
from gradsweep.track.hooks import delivery_hook, hook_target, preload_modules
from gradsweep.track.journal import (HEADER, STATE, RunJournal, default_spool_dir, now_ms, read_json, refused_error,
                                     worker_alive, worker_id)
from gradsweep.track.settings import TrackingConfig
from gradsweep.track.uri import absolute_sqlite, is_local_sqlite, mask, sqlite_path, store_kind

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from gradsweep.track.history import Histories

log = logging.getLogger("gradsweep.tracking")


def resolve_uri(uri: str) -> str:
    """Make a relative embedded-store path absolute and create its folder."""
    return absolute_sqlite(uri, create=True)


def close_dead_runs(tracker: "Tracker", spool: Optional[Path] = None, delivering: Optional[Path] = None) -> list[str]:
    """Runs left RUNNING by a process that no longer exists (SIGKILL, a crash): closed KILLED with tag
    ``failure=worker_died``, so a restarted sweep leaves nothing RUNNING. A run with a journal still
    in ``spool`` is its journal's to end: the journal being delivered (``delivering``: the one that
    asked), a journal whose writer is alive or that holds its own ending are left alone; the journal
    of a dead writer gets its ending and is delivered."""
    from gradsweep.track.journal import close_orphan, journal_run_ids

    journals = {run_id: folder for folder in (delivery.pending(spool) if spool is not None else ())
                for run_id in journal_run_ids(folder)}
    closed = []
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                      max_results=1000)
    for run in runs:
        journal = journals.get(run.info.run_id)
        if journal is not None:
            if journal == delivering or not close_orphan(journal):
                continue
        else:
            worker = run.data.tags.get(WORKER_TAG)
            if not worker or worker_alive(worker):
                continue
        if journal is None or not _delivered(journal):  # else its journal said it, with all its records
            tracker.client.set_tag(run.info.run_id, FAILURE_TAG, "worker_died")
            tracker.client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d run(s) left RUNNING by dead processes as KILLED", len(closed))
    return closed


def _delivered(folder: Path) -> bool:
    try:
        return delivery.deliver(folder)
    except (delivery.Busy, delivery.Unreachable):
        return False


@delivery_hook()
def close_dead_runs_hook(header: dict[str, Any], folder: Optional[Path] = None, **_: Any) -> dict[str, Any]:
    """:func:`close_dead_runs` as a delivery hook (a sweep's parent journal asks for it)."""
    tracker = Tracker(header["uri"], header["experiment_name"], header.get("artifact_location"))
    return {"closed": close_dead_runs(tracker, folder.parent if folder else None, folder)}


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


def children_pending(folder: Path, run_id: Optional[str]) -> list[Path]:
    """Journals in ``folder``'s spool of runs whose parent is ``folder``'s run and that are not
    fully delivered yet."""
    out = []
    for child in delivery.pending(folder.parent):
        header = read_json(child / HEADER) or {}
        create = header.get("create") or {}
        if folder.name in (header.get("parent_local_id"), create.get("parent_local_id")) or \
                (run_id and run_id in (header.get("parent_run_id"), create.get("parent_run_id"))):
            out.append(child)
    return out


def deliver_children(folder: Path, run_id: Optional[str]) -> None:
    """Deliver what the children of ``folder``'s run left (closing those whose writer died, as
    ``gradsweep sync`` does); HookNotReady while one is still being written or delivered."""
    from gradsweep.track.journal import close_orphan

    for child in children_pending(folder, run_id):
        close_orphan(child)
        try:
            done = delivery.deliver(child)
        except delivery.Busy:
            done = False
        if not done:
            raise delivery.HookNotReady(f"child journal {child.name} not delivered yet")


# ------------------------------------------------------------------------------ run journals
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
            _fail_on_store(uri, run_id, "journal_unwritable", str(e))
        raise
    if existing:  # a resumed run: it is this process's now (see close_dead_runs)
        journal.set_tags({WORKER_TAG: tags[WORKER_TAG]})
    DeliveryWorker.ensure(spool, uri)
    DeliveryWorker.nudge(spool)  # a new journal: its run is created now, not at the next look
    return MlflowRun(journal, tracking.delivery_timeout_s, run_name, deferred=parent_local_id is not None)


def spool_of(tracking: TrackingConfig) -> Path:
    """Where runs of ``tracking`` are journaled before delivery."""
    return Path(tracking.spool_dir) if tracking.spool_dir else default_spool_dir(resolve_uri(tracking.uri))


def hand_over(spool: Path, run_id: str) -> int:
    """A run about to be continued in place: its journals left by a process that died (SIGKILL)
    are delivered to their last complete record, without ending the run, so its dense history and
    metrics so far are on the store before the new process reads them. Returns how many."""
    from gradsweep.track.journal import close_orphan, journal_run_ids

    settled = 0
    for folder in delivery.pending(spool):
        if run_id in journal_run_ids(folder) and close_orphan(folder, handover=True):
            try:
                settled += bool(delivery.deliver(folder, wait_s=30.0))
            except (delivery.Busy, delivery.Unreachable):
                pass
    if settled:
        delivery.remove_delivered(spool)  # what the dead writers left: their processes are gone
    return settled


#: runs this process continues in place (``trainer.resume_from=<run id>``): claim file -> descriptor
_claims: dict[Path, int] = {}


def _refuse_writer(run_id: str, who: str) -> Exception:
    from gradsweep.errors import ConfigError

    return ConfigError(f"trainer.resume_from={run_id}: the run is being written by a live process ({who}); "
                       "allowed: a run no live process writes (wait for it to end or stop it, then resume)")


def claim_run(spool: Path, run_id: str) -> None:
    """A run continued in place has one writer: claimed by a lock in ``spool`` held for this process's
    life, before the store is read; ConfigError if another live process has claimed it."""
    from gradsweep.locks import Busy, hold

    path = (spool / delivery.CLAIMS / f"{run_id}.lock").resolve()
    if path in _claims:
        return
    try:
        _claims[path] = hold(path)
    except Busy as e:
        raise _refuse_writer(run_id, str(e)) from None
    except OSError:  # a spool we cannot write: the journal's creation says so
        pass


def refuse_live_writer(spool: Path, run: Any) -> None:
    """ConfigError while a process that did not claim the run (:func:`claim_run`) still writes it:
    a writer whose journal is in ``spool``, or the writer the store names (``gradsweep.worker``)
    where this host can tell it is alive."""
    from gradsweep.locks import describe, process_state
    from gradsweep.track.journal import journal_run_ids, writer_alive

    run_id = run.info.run_id
    for folder in delivery.pending(spool):
        if run_id in journal_run_ids(folder) and writer_alive(folder):
            worker = (read_json(folder / HEADER) or {}).get("worker") or ""
            raise _refuse_writer(run_id, describe(worker) or "its journal's writer")
    worker = run.data.tags.get(WORKER_TAG)
    if run.info.status == "RUNNING" and worker and worker != worker_id() and process_state(worker):
        raise _refuse_writer(run_id, describe(worker))


def close_run(journal: RunJournal, status: str, timeout_s: float = 60.0, wait: bool = True) -> bool:
    """Write the final status and deliver what is left. False if the store stayed unreachable:
    the journal stays on disk for ``gradsweep sync``. A lost journal (deleted, disk full) raises
    RecordingLost once the run is closed FAILED on the store, where the store can be told.
    ``wait=False``: return once the status is written if this process's delivery process is alive
    (it, or the parent run's summary hook, delivers the rest)."""
    try:
        journal.end(status)
    except RecordingLost:
        pass
    if journal.lost is not None:
        _close_lost(journal)
    DeliveryWorker.nudge(journal.folder.parent)
    if not wait and DeliveryWorker.alive(journal.folder.parent):
        return True
    deadline = Deadline(journal.folder.parent, timeout_s)
    if not mlflow_loaded() and DeliveryWorker.alive(journal.folder.parent):
        delivered = _wait_for_worker(journal, deadline)
        if delivered is not None:
            return delivered
    reporter = delivery.OutageReporter()
    while True:
        try:
            if delivery.deliver(journal.folder, wait_s=max(0.1, min(30.0, deadline.left()))):
                reporter.reachable(journal.folder.parent)
                _raise_if_refused(read_json(journal.folder / STATE) or {})
                return True
        except delivery.Busy:  # the delivery process holds the journal: wait for it, not past the deadline
            pass
        except delivery.Unreachable as e:
            reporter.unreachable(journal.folder.parent, str(e))
        if deadline.passed():
            return _not_delivered(journal, deadline.reason())
        time.sleep(1.0)


class Deadline:
    """How long a run's end waits for its delivery: ``timeout_s`` without progress. Delivery that is
    merely behind (records still being sent, by whichever process) moves the deadline; a store
    that does not answer, or a delivery that is stuck, does not."""

    def __init__(self, spool: Path, timeout_s: float) -> None:
        self.spool, self.timeout_s = spool, timeout_s
        self.at = time.monotonic() + timeout_s
        self.seen = self._progress()
        self.checked = time.monotonic()

    def _progress(self) -> tuple:
        """What has been delivered from ``spool`` so far: per pending journal, its offsets."""
        out = []
        for folder in delivery.pending(self.spool):
            state = read_json(folder / STATE) or {}
            steps = state.get("steps") or {}
            out.append((folder.name, state.get("offset", 0), *sorted(steps.items())))
        return tuple(out)

    def _update(self) -> None:
        now = time.monotonic()
        if now - self.checked < 1.0:
            return
        self.checked = now
        progress = self._progress()
        if progress != self.seen and not self.unreachable():
            self.seen, self.at = progress, now + self.timeout_s

    def unreachable(self) -> bool:
        return (self.spool / ".outage").exists()

    def left(self) -> float:
        self._update()
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0

    def reason(self) -> str:
        if self.unreachable():
            return "the tracking store did not answer"
        return (f"its delivery made no progress for {self.timeout_s:g} s (another process holds its journal, "
                "or the tracking store is not taking its records)")


def mlflow_loaded() -> bool:
    """Whether this process has MLflow already (a sweep's: its callback and sweeper use it). A single
    job does not: its delivery process creates the run and delivers everything, and the training
    process never spends the seconds importing MLflow takes (benchmarks/startup_speed.py prints
    what a job costs against a bare PyTorch script)."""
    return "mlflow.tracking" in sys.modules


def _wait_for_worker(journal: RunJournal, deadline: Deadline) -> Optional[bool]:
    """Wait for the delivery process to deliver the ended journal. True when it has, False at the
    deadline (the journal stays for `gradsweep sync`), None if the delivery process died (deliver here)."""
    while not deadline.passed():
        state = read_json(journal.folder / STATE) or {}
        if state.get("done") or not (journal.folder / HEADER).exists():
            _raise_if_refused(state)
            return True
        if not DeliveryWorker.alive(journal.folder.parent):
            return None
        time.sleep(0.05)
    return _not_delivered(journal, deadline.reason())


#: runs of this process whose end was not fully delivered: (name, why); the command's exit status says so
UNDELIVERED: list[tuple[str, str]] = []


def _not_delivered(journal: RunJournal, reason: str) -> bool:
    name = journal.run_id or (journal.header.get("create") or {}).get("run_name") or journal.local_id
    UNDELIVERED.append((str(name), reason))
    print(f"[gradsweep] run {name} not fully delivered: {reason}. It stays in {journal.folder.parent}; "
          "`gradsweep sync` delivers it" + (" when the store is back" if "did not answer" in reason else ""),
          file=sys.stderr, flush=True)
    return False


def _raise_if_refused(state: dict[str, Any]) -> None:
    """The journal's state says the store refused to create its run: the job ends with why."""
    if state.get("refused"):
        raise refused_error(state)


def _close_lost(journal: RunJournal) -> NoReturn:
    """The journal is gone: tell the store directly that the run FAILED and why, say what was lost."""
    reason = f"run journal {journal.lost}"
    told, run_id = False, journal.run_id
    uri = journal.header.get("uri")
    if uri:
        try:
            run_id = run_id or _created_by_this_process(journal)
            if run_id:
                _fail_on_store(uri, run_id, "journal_lost", reason)
                told = True
        except Exception:  # the store is down as well: nothing more can be done from here
            pass
    where = f"run {run_id}" if run_id else f"spooled run {journal.local_id}"
    stopped = f"Training stopped after step {journal.last_step}; " if journal.last_step >= 0 else ""
    print(f"[gradsweep] {where}: {reason}. {stopped}what had not reached the tracking store by then is lost. "
          + ("The run is marked FAILED there (failure=journal_lost)." if told else
             "The store could not be told: the run may show RUNNING there."), file=sys.stderr, flush=True)
    raise RecordingLost(f"{where}: {reason}; the run is {'FAILED' if told else 'not closed'} in the tracking store")


def _created_by_this_process(journal: RunJournal) -> Optional[str]:
    """The run the delivery process created for this journal, when the journal (and the state file
    that held its id) vanished before this process read it: found by its worker tag."""
    create = journal.header.get("create")
    if not create:
        return None
    client = delivery.mlflow_client(journal.header["uri"])
    exp = client.get_experiment_by_name(journal.header["experiment_name"])
    worker = (create.get("tags") or {}).get(WORKER_TAG)
    if exp is None or not worker:
        return None
    name = str(create.get("run_name") or "").replace("'", "\\'")
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{WORKER_TAG}` = '{worker}' and attributes.status = 'RUNNING' "
                              f"and attributes.run_name = '{name}'", max_results=2,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _fail_on_store(uri: str, run_id: str, failure: str, reason: str) -> None:
    client = delivery.mlflow_client(uri)
    client.set_tag(run_id, FAILURE_TAG, failure)
    client.set_tag(run_id, FAILURE_REASON_TAG, reason[:5000])
    client.set_terminated(run_id, "FAILED")


class DeliveryWorker:
    """One delivery process per training process and spool folder (see :mod:`gradsweep.track.delivery`).

    It stops when this process closes its stdin pipe, i.e. also when this process dies."""

    _workers: dict[Path, subprocess.Popen] = {}

    @classmethod
    def alive(cls, spool: Path) -> bool:
        proc = cls._workers.get(spool.resolve())
        return proc is not None and proc.poll() is None

    @classmethod
    def nudge(cls, spool: Path) -> None:
        """Tell this process's delivery process for ``spool`` that a run was opened or has ended:
        it looks at the spool now instead of at its next poll."""
        proc = cls._workers.get(spool.resolve())
        if proc is None or proc.poll() is not None:
            return
        assert proc.stdin is not None  # started with stdin=PIPE
        try:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        except OSError:  # it has just ended: the caller delivers what is left itself
            pass

    @classmethod
    def ensure(cls, spool: Path, uri: Optional[str] = None) -> None:
        """Start the delivery process for ``spool`` unless it runs; ``uri``: the store it will
        deliver to (it loads that kind of store's code while it waits; the URI itself, which may
        hold a password, is not put on its command line)."""
        spool = spool.resolve()
        proc = cls._workers.get(spool)
        if proc is not None and proc.poll() is None:
            return
        src = str(SRC)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        kind = store_kind(uri) if uri else None
        cls._workers[spool] = subprocess.Popen(
            [sys.executable, "-m", "gradsweep.track.delivery", str(spool), "--owner-pid", str(os.getpid()),
             *(["--store", kind] if kind else [])],
            stdin=subprocess.PIPE, env=env, start_new_session=True)
