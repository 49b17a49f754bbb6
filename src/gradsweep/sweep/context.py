"""What a job learns about the sweep it runs in: one typed object, one channel.

Written in three places and read in one:

* ``gradsweep sweep run`` / ``gradsweep schedule`` start ``train.py -m`` with ``parent_tags``
  (the schedule's name and time) in the environment of that process;
* the sweep callback (:mod:`gradsweep.sweep.callback`) opens the sweep's parent run and adds
  ``sweep_id`` and the parent's ids, for every job of the sweep;
* gradsweep's Optuna sweeper adds the ``study`` and each job's ``trial_id`` and ``run_name``.

The channel is one environment variable, ``GRADSWEEP_SWEEP`` (JSON). Jobs in the sweeping process
read it directly, and so do a launcher's worker processes started from it (they inherit the
environment). The Optuna sweeper hands each job its own context through Hydra's per-job
``hydra.job.env_set`` (see :meth:`SweepContext.job_override`), which every launcher applies in the
job's process, on whatever host it runs. It carries no secret: the study's storage URL (which may
hold a password) is not in it; a job reads it from its own Hydra config.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

ENV = "GRADSWEEP_SWEEP"


@dataclass(frozen=True)
class SweepContext:
    parent_tags: dict[str, str] = field(default_factory=dict)  #: extra tags for the sweep's parent run
    sweep_id: Optional[str] = None
    parent_run_id: Optional[str] = None  #: the parent run on the tracking store
    parent_local_id: Optional[str] = None  #: the parent's journal, when the store was down at its start
    constant_keys: tuple[str, ...] = ()  #: command-line keys every job of the sweep sets alike
    study_name: Optional[str] = None  #: set by gradsweep's Optuna sweeper
    trial_id: Optional[int] = None  #: the job's Optuna trial
    run_name: Optional[str] = None  #: the job's MLflow run name (``trial 7: lr=0.0404 ...``), else from its overrides

    @classmethod
    def current(cls) -> Optional["SweepContext"]:
        raw = os.environ.get(ENV)
        if not raw:
            return None
        if not raw.startswith("{"):  # from job_override: base64url
            raw = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        data = json.loads(raw)
        data["constant_keys"] = tuple(data.get("constant_keys", ()))
        return cls(**data)

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
        """The Hydra override that hands this context to one job, in whatever process it runs.

        Base64url: Hydra's override grammar and OmegaConf's interpolation would otherwise change
        quotes, backslashes, non-ASCII text and ``${...}`` in names on the way."""
        encoded = base64.urlsafe_b64encode(self.to_json().encode()).decode().rstrip("=")
        return f"++hydra.job.env_set.{ENV}={encoded}"

    def env(self) -> dict[str, str]:
        """For a child process started outside Hydra (``gradsweep sweep run``)."""
        return {ENV: self.to_json()}


