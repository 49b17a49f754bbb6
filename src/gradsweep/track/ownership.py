"""Who writes, delivers and ends a run: runs whose writer died are closed (:func:`close_dead_runs`)
or handed over to the process that continues them (:func:`hand_over`); a run continued in place
has one writer (:func:`claim_run`, :func:`refuse_live_writer`); a sweep's parent run delivers what
its children's journals left (:func:`deliver_children`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from gradsweep.errors import ConfigError
from gradsweep.locks import Busy, describe, hold, process_state
from gradsweep.names import FAILURE_TAG, WORKER_TAG
from gradsweep.track import delivery
from gradsweep.track.hooks import delivery_hook
from gradsweep.track.journal import (HEADER, close_orphan, journal_run_ids, read_json, worker_alive, worker_id,
                                     writer_alive)
from gradsweep.track.tracker import Tracker

log = logging.getLogger("gradsweep.tracking")


def close_dead_runs(tracker: Tracker, spool: Optional[Path] = None, delivering: Optional[Path] = None) -> list[str]:
    """Runs left RUNNING by a process that no longer exists (SIGKILL, a crash): closed KILLED with tag
    ``failure=worker_died``, so a restarted sweep leaves nothing RUNNING. A run with a journal still
    in ``spool`` is its journal's to end: the journal being delivered (``delivering``: the one that
    asked), a journal whose writer is alive or that holds its own ending are left alone; the journal
    of a dead writer gets its ending and is delivered."""
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
    for child in children_pending(folder, run_id):
        close_orphan(child)
        try:
            done = delivery.deliver(child)
        except delivery.Busy:
            done = False
        if not done:
            raise delivery.HookNotReady(f"child journal {child.name} not delivered yet")


def hand_over(spool: Path, run_id: str) -> int:
    """A run about to be continued in place: its journals left by a process that died (SIGKILL)
    are delivered to their last complete record, without ending the run, so its dense history and
    metrics so far are on the store before the new process reads them. Returns how many."""
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
    return ConfigError(f"trainer.resume_from={run_id}: the run is being written by a live process ({who}); "
                       "allowed: a run no live process writes (wait for it to end or stop it, then resume)")


def claim_run(spool: Path, run_id: str) -> None:
    """A run continued in place has one writer: claimed by a lock in ``spool`` held for this process's
    life, before the store is read; ConfigError if another live process has claimed it."""
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
    run_id = run.info.run_id
    for folder in delivery.pending(spool):
        if run_id in journal_run_ids(folder) and writer_alive(folder):
            worker = (read_json(folder / HEADER) or {}).get("worker") or ""
            raise _refuse_writer(run_id, describe(worker) or "its journal's writer")
    worker = run.data.tags.get(WORKER_TAG)
    if run.info.status == "RUNNING" and worker and worker != worker_id() and process_state(worker):
        raise _refuse_writer(run_id, describe(worker))
