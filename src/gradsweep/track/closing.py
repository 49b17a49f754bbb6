"""A run's end: its final status written and what is left delivered (:func:`close_run`), waiting
for delivery no longer than it makes progress (:class:`Deadline`), and a run whose journal was
lost closed FAILED on the store directly. Runs whose end did not reach the store are listed in
:data:`UNDELIVERED` (the command's exit status says so)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

from gradsweep.errors import RecordingLost
from gradsweep.names import FAILURE_REASON_TAG, FAILURE_TAG, WORKER_TAG
from gradsweep.track import delivery
from gradsweep.track.journal import HEADER, STATE, RunJournal, read_json, refused_error
from gradsweep.track.worker import DeliveryWorker, mlflow_loaded


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
                fail_on_store(uri, run_id, "journal_lost", reason)
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


def fail_on_store(uri: str, run_id: str, failure: str, reason: str) -> None:
    """Close a run FAILED on the store directly, tagged with why (its journal cannot say it)."""
    client = delivery.mlflow_client(uri)
    client.set_tag(run_id, FAILURE_TAG, failure)
    client.set_tag(run_id, FAILURE_REASON_TAG, reason[:5000])
    client.set_terminated(run_id, "FAILED")
