"""The job's side of an Optuna sweep: find this job's trial, report dev accuracy to it, prune.

:class:`gradsweep.sweep.optuna_loop.GradsweepOptunaSweeperImpl` asks Optuna for a trial and launches a
Hydra job for it with the study and the trial id in its :class:`~gradsweep.sweep.context.SweepContext`.
The job (:func:`gradsweep.sweep.hydra_adapter.job_from_hydra`) calls :func:`job_trial`:

* in the sweeper's process (Hydra's basic launcher) it gets the very trial object the sweeper asked
  for (works with every storage, in-memory included);
* in another process (a parallel launcher) it loads the study from the storage with the same
  pruner and opens the trial by id.

Each evaluation's dev accuracy is reported with ``trial.report(acc, step)`` (step = optimizer
step); when the pruner says so, :class:`TrialPruned` stops the run (the job closes it FINISHED with
tag ``gradsweep.stopped=pruned``, its name ending ``(pruned)``) and reaches the sweeper, which tells Optuna PRUNED.
The training loop never sees Optuna: it only calls ``on_eval``.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional

import optuna

from gradsweep.compat.optuna import trial_id as id_of
from gradsweep.errors import StopRun
from gradsweep.names import STUDY_TAG, TRIAL_NUMBER_TAG, TRIAL_STATE_TAG
from gradsweep.sweep.optuna_storage import make_pruner, make_storage, resolve_storage_url

log = logging.getLogger("gradsweep")


# Trials being run by a sweeper in this process, by trial id (filled by the sweeper around launch).
_live: dict[int, optuna.trial.Trial] = {}
_live_lock = threading.Lock()


class TrialPruned(optuna.TrialPruned, StopRun):
    """Optuna's pruning signal that is also the job's "stop this run on purpose" signal."""

    reason = "pruned"

    def __init__(self, message: str = "pruned", step: int = -1):
        super().__init__(message)
        self.step = step

    def __reduce__(self):  # keep ``step`` when a parallel launcher pickles the job's result
        return type(self), (str(self), self.step)


def register_live(trials: list[optuna.trial.Trial]) -> None:
    with _live_lock:
        for t in trials:
            _live[id_of(t)] = t


def unregister_live(trials: list[optuna.trial.Trial]) -> None:
    with _live_lock:
        for t in trials:
            _live.pop(id_of(t), None)


@dataclass
class JobTrial:
    """The Optuna trial a job runs for."""

    trial: optuna.trial.Trial
    study_name: str

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def tags(self) -> dict[str, str]:
        """Tags for the job's MLflow run; the sweeper sets the final ``optuna.state`` after telling."""
        return {STUDY_TAG: self.study_name, TRIAL_NUMBER_TAG: str(self.number), TRIAL_STATE_TAG: "RUNNING"}

    def on_eval(self, step: int, dev_acc: float) -> None:
        """Called by the training loop after each evaluation."""
        self.trial.report(dev_acc, step)
        if self.trial.should_prune():
            log.info("trial %d pruned at step %d (dev acc %.4f)", self.number, step, dev_acc)
            raise TrialPruned(f"trial {self.number} pruned at step {step} (dev acc {dev_acc:.4f})", step)


def job_trial(study_name: str, trial_id: int, storage: Optional[str], pruner: Optional[dict]) -> Optional[JobTrial]:
    """The job's trial: the sweeper's own trial object in its process, else opened from the storage
    (``storage`` and ``pruner`` as the job's own Hydra config states them)."""
    with _live_lock:
        trial = _live.get(trial_id)
    if trial is None:
        if storage is None:  # an in-memory study lives only in the sweeper's process
            log.warning("trial %d: in-memory Optuna storage is not reachable from this process; "
                        "no intermediate reports or pruning (set hydra.sweeper.storage)", trial_id)
            return None
        loaded = optuna.load_study(study_name=study_name, storage=make_storage(resolve_storage_url(storage)),
                                   pruner=make_pruner(pruner))
        trial = optuna.trial.Trial(loaded, trial_id)
    return JobTrial(trial, study_name)
