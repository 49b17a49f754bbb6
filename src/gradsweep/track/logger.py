"""The run-logger seam: everything a job records goes through :class:`RunLogger`.

A backend is chosen by configuration (``tracking.backend``):

* ``mlflow`` (default): a run journal on local disk, delivered to the MLflow tracking store by a
  separate process (:mod:`gradsweep.track.mlflow_run`, :mod:`gradsweep.track.delivery`);
* ``memory``: kept in this process and dropped at its end (a dry run: train and see the console,
  record nothing; the job's tests use it to check what a run records without a store).

Only the ``mlflow`` backend imports MLflow.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from gradsweep.track.settings import TrackingConfig
from gradsweep.track.steps import OPTIONAL


class RunLogger(Protocol):
    @property
    def run_ref(self) -> str:
        """How to name the run to a person: its id on the store, or where it waits to be delivered."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        """The names of the run's step values (see :class:`gradsweep.train.sinks.Sink`)."""

    def log_steps(self, steps, values) -> None:
        """Step rows: ``steps`` (k,) int64, ``values`` (k, len(names)) float32."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, move: bool = False) -> None:
        """The file as it is now (it may change later, e.g. ``last.pt``). ``move``: the store's copy
        is the one kept: the file is removed once the store has it (``tracking.keep_local_artifacts``)."""

    def finish(self, status: str) -> bool:
        """Record the final status (FINISHED | FAILED | KILLED); False if not everything reached the store."""


class MemoryRunLogger:
    """``tracking.backend=memory``: every record kept in this object."""

    def __init__(self, run_name: str, tags: dict[str, str]) -> None:
        self.run_name = run_name
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {k: str(v) for k, v in tags.items()}
        self.artifacts: dict[str, bytes] = {}  # "<artifact_path>/<name>" -> content
        self.status: Optional[str] = None
        self.step_names: list[str] = []

    @property
    def run_ref(self) -> str:
        return "(in memory)"

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.metrics[k].append((step, float(v)))

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        self.step_names = list(names)

    def log_steps(self, steps, values) -> None:
        for step, row in zip(steps.tolist(), values.tolist(), strict=True):
            self.log_metrics(step, {k: v for k, v in zip(self.step_names, row, strict=True)
                                    if not (k in OPTIONAL and math.isnan(v))})

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update({k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, move: bool = False) -> None:
        path = Path(path)  # a dry run records nothing beyond this process: the file stays (move or not)
        self.artifacts[f"{artifact_path}/{path.name}" if artifact_path else path.name] = path.read_bytes()

    def finish(self, status: str) -> bool:
        self.status = status
        return True


def open_run_logger(tracking: TrackingConfig, run_name: str, tags: dict[str, str], *,
                    parent_run_id: Optional[str] = None, parent_local_id: Optional[str] = None,
                    run_id: Optional[str] = None, hooks: tuple[Callable[..., Any], ...] = ()) -> RunLogger:
    """Open a new run (or continue ``run_id``) on the configured backend. ``hooks``: the delivery
    hooks the run will ask for (the ``mlflow`` backend's ``after_delivery``)."""
    if tracking.backend == "memory":
        return MemoryRunLogger(run_name, tags)
    from gradsweep.track.mlflow_run import open_run  # MLflow: only for this backend

    return open_run(tracking, run_name, tags, parent_run_id=parent_run_id, parent_local_id=parent_local_id,
                    run_id=run_id, hooks=hooks)
