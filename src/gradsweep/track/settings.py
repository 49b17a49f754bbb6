"""The ``tracking`` config group's schema: where runs are recorded and how they are delivered."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gradsweep.checks import choice, positive, require
from gradsweep.names import EMBEDDED_STORE, EXPERIMENT
from gradsweep.track.steps import check_param_groups
from gradsweep.track.uri import check_tracking_uri


BACKENDS = ("mlflow", "memory")
MAX_EXPERIMENT_NAME = 256  # MLflow's column (VARCHAR(256)); longer names fail on a PostgreSQL-backed server


@dataclass
class TrackingConfig:
    #: mlflow: a run journal delivered to the tracking store at ``uri``; memory: record nothing
    #: beyond this process (a dry run; see gradsweep.track.logger)
    backend: str = "mlflow"
    uri: str = EMBEDDED_STORE  # or http://host:port; MLFLOW_TRACKING_URI wins if set
    experiment_name: str = EXPERIMENT
    artifact_location: Optional[str] = None  # embedded store: defaults to mlruns/artifacts
    spool_dir: Optional[str] = None  # run journals before delivery; default: mlruns/spool
    delivery_timeout_s: float = 60.0  # at the end of a run, wait this long for an unreachable store
    #: points per metric and run that go to MLflow (min and max of each window of steps survive;
    #: a run this short logs every step). MLflow's UI never draws more than 2,500 per run and metric.
    #: The dense history (telemetry/ artifacts, gradsweep.history) keeps every step regardless.
    max_points: int = 2500
    #: the same for each parameter's norm (grad_norm/<param>): a 100-tensor model at 2,500 points
    #: each would leave ~70 MB of MLflow's sqlite rows per run (~280 bytes a value)
    max_param_points: int = 250
    #: how parameter norms appear in MLflow: tensor (one curve each) | module (weight and bias of a
    #: module together) | depth:N (the first N parts of the name: depth:2 -> one curve per blocks.<i>)
    #: | re:<pattern> (its first group names the curve). Each group's norm is the L2 norm of its
    #: tensors' gradients together; the dense history keeps every tensor whatever this says.
    param_groups: str = "tensor"
    log_figures: bool = True
    log_checkpoints: bool = True
    #: false: a checkpoint or figure the run logs lives in one place, the store: the job folder's
    #: copy is removed once the store has it (a run the store did not get keeps it; resume by run
    #: id fetches it back). true: the job folder keeps its own copy as well
    keep_local_artifacts: bool = False

    def __post_init__(self) -> None:
        choice("tracking.backend", self.backend, BACKENDS)
        check_tracking_uri(self.uri)
        name = self.experiment_name
        require(bool(name.strip()) and len(name) <= MAX_EXPERIMENT_NAME and name.isprintable(),
                "tracking.experiment_name", name if len(name) <= 60 else f"{name[:40]}... ({len(name)} characters)",
                f"a printable name of 1-{MAX_EXPERIMENT_NAME} characters")
        positive("tracking.delivery_timeout_s", self.delivery_timeout_s, strict=False)
        why = check_param_groups(self.param_groups)
        require(why is None, "tracking.param_groups", self.param_groups,
                f"tensor|module|depth:N|re:<pattern> ({why})")
        for key in ("max_points", "max_param_points"):
            value = getattr(self, key)
            require(isinstance(value, int) and 2 <= value <= 1_000_000, f"tracking.{key}", value,
                    "an integer from 2 to 1000000")
