"""Trials whose sweep process is gone, found by Optuna's heartbeats on any host.

The sweep process that asks a trial beats for it (``RDBStorage.record_heartbeat``) every
``heartbeat_interval`` seconds until it tells the trial's end: :class:`Heartbeat`. A trial whose
beats stopped for longer than ``grace_period`` (its sweep process SIGKILLed, its machine lost) is
failed by Optuna's ``fail_stale_trials``, which :func:`fail_stale` calls when an invocation of the
study starts, before each batch and at its end, from whichever host. No process id is compared: a
worker on another machine, or in a PID namespace, is judged by its beats alone.

Optuna skips a trial that never beat (its process died between asking it and its first beat, a
window of one storage commit). A live process marks every trial it asks, after that first beat, with
the reason it would fail for (user attr ``gradsweep_failure``, cleared when the trial ends otherwise),
so a RUNNING trial without the mark that is older than the grace period never beat: it is failed too.
Heartbeats are an RDB-storage feature (sqlite, PostgreSQL, MySQL); a journal-file study has none.
"""
from __future__ import annotations

import logging
import threading
import warnings
from datetime import datetime, timedelta
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from gradsweep.compat.optuna import trial_id as id_of

log = logging.getLogger("gradsweep")
FAILURE_ATTR = "gradsweep_failure"  #: why a trial FAILed (set on FAIL; before, the reason a stale one would have)
#: Optuna warns at every ask() of a storage with heartbeats outside Study.optimize(); ours are sent
#: by Heartbeat below, so the warning does not apply
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def beats(storage: Any) -> bool:
    """Whether ``storage`` keeps heartbeats (an RDB storage made with a heartbeat interval)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def grace_of(storage: Any) -> int:
    """Seconds without a beat after which a trial is stale (Optuna's default: twice the interval)."""
    return storage.grace_period or 2 * storage.get_heartbeat_interval()


def stale_reason(worker: str, grace_s: int) -> str:
    return f"its sweep process {worker} stopped: no heartbeat for more than {grace_s} s (killed, or its machine lost)"


NEVER_BEAT = "its sweep process stopped before the trial's first heartbeat"


class Heartbeat:
    """Beats for the trials this process has asked and not yet told, in a background thread."""

    def __init__(self, storage: Any, worker: str) -> None:
        self.storage, self.worker = storage, worker
        self.on = beats(storage)
        self.live: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: Optional[threading.Thread] = None

    def run(self) -> "Heartbeat":
        if self.on:
            self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
            self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def start(self, trial: optuna.trial.Trial) -> None:
        """First beat of a trial just asked, then its mark (see the module's docstring)."""
        if not self.on:
            return
        self.storage.record_heartbeat(id_of(trial))
        with self.lock:
            self.live.add(id_of(trial))
        trial.set_user_attr(FAILURE_ATTR, stale_reason(self.worker, grace_of(self.storage)))

    def end(self, trials: list[optuna.trial.Trial]) -> None:
        with self.lock:
            self.live.difference_update(id_of(t) for t in trials)

    def _run(self) -> None:
        while not self.stop.wait(self.storage.get_heartbeat_interval()):
            with self.lock:
                live = list(self.live)
            for trial_id in live:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # the storage is down: the trial may go stale, which is then true
                    log.warning("heartbeat of Optuna trial id %d not recorded: %s", trial_id, e)


def fail_stale(study: optuna.Study, storage: Any) -> list[tuple[int, str]]:
    """Fail the study's trials whose sweep process is gone; (number, reason) of each."""
    if not beats(storage):
        return []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    oldest = datetime.now() - timedelta(seconds=grace_of(storage))
    for t in running:
        if FAILURE_ATTR not in t.user_attrs and t.datetime_start is not None and t.datetime_start < oldest:
            storage.set_trial_user_attr(id_of(t), FAILURE_ATTR, NEVER_BEAT)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now_running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.number in {r.number for r in running} and t.number not in now_running]
    return [(t.number, t.user_attrs.get(FAILURE_ATTR) or NEVER_BEAT) for t in failed]
