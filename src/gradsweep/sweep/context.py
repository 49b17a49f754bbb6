"""What a job learns about the sweep it runs in: one typed object, one channel.

Written in three places and read in one:

* ``gradsweep sweep run`` / ``gradsweep schedule`` start ``train.py -m`` with ``parent_tags``
  (the schedule's name and time) in the environment of that process;
* the sweep callback (:mod:`gradsweep.sweep.callback`) opens the sweep's parent run and adds
  ``sweep_id`` and the parent's ids, for every job of the sweep;
* gradsweep's Optuna sweeper adds the ``study`` and each job's ``trial_id``.

The channel is one environment variable, ``GRADSWEEP_SWEEP`` (JSON). Jobs in the sweeping process
read it directly; a launcher's jobs in other processes or on other hosts receive it through Hydra's
own per-job ``hydra.job.env_set`` (see :meth:`SweepContext.job_override`), which every launcher
applies in the job's process.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

ENV = "GRADSWEEP_SWEEP"


@dataclass(frozen=True)
class StudySpec:
    """What a job in another process needs to open the Optuna study (the storage URL is absolute)."""

    study_name: str
    storage: Optional[str]
    pruner: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class SweepContext:
    parent_tags: dict[str, str] = field(default_factory=dict)  #: extra tags for the sweep's parent run
    sweep_id: Optional[str] = None
    parent_run_id: Optional[str] = None  #: the parent run on the tracking store
    parent_local_id: Optional[str] = None  #: the parent's journal, when the store was down at its start
    study: Optional[StudySpec] = None  #: set by gradsweep's Optuna sweeper
    trial_id: Optional[int] = None  #: the job's Optuna trial

    @classmethod
    def current(cls) -> Optional["SweepContext"]:
        raw = os.environ.get(ENV)
        if not raw:
            return None
        data = json.loads(raw)
        study = data.pop("study", None)
        return cls(**data, study=StudySpec(**study) if study else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def install(self) -> None:
        """Make this the context of every job started from this process from now on."""
        os.environ[ENV] = self.to_json()

    @staticmethod
    def uninstall(previous: Optional["SweepContext"]) -> None:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            previous.install()

    def with_(self, **changes: Any) -> "SweepContext":
        return replace(self, **changes)

    def job_override(self) -> str:
        """The Hydra override that hands this context to one job, in whatever process it runs."""
        quoted = self.to_json().replace("\\", "\\\\").replace("'", "\\'")
        return f"++hydra.job.env_set.{ENV}='{quoted}'"

    def env(self) -> dict[str, str]:
        """For a child process started outside Hydra (``gradsweep sweep run``)."""
        return {ENV: self.to_json()}

    def job_trial(self):
        """The job's Optuna trial, or None when gradsweep's Optuna sweeper did not launch this job."""
        if self.trial_id is None or self.study is None:
            return None
        from gradsweep.sweep.optuna_trial import job_trial  # Optuna: only in Optuna sweeps

        return job_trial(self.study, self.trial_id)
