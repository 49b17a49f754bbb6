"""Resuming a job (``trainer.resume_from``): from a checkpoint file (a new run) or a run on the
tracking store (the same run continued in place, or a new run continuing a FINISHED one); the
checkpoints checked against the job, and the history the run already holds carried on."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from gradsweep.errors import CheckpointError
from gradsweep.names import RUN_ID
from gradsweep.run.spec import JobSpec
from gradsweep.train.checkpoints import check_compatible, load_checkpoint
from gradsweep.train.loop import Trainer, run_length
from gradsweep.train.registry import build
from gradsweep.train.sinks import HistorySink

if TYPE_CHECKING:
    from gradsweep.track.tracker import Tracker


@dataclass
class Resume:
    last: dict  # the checkpoint to continue from
    best: Optional[dict]  # the best checkpoint so far, if there is one
    run_id: Optional[str] = None  # continue this run (resume_from was a run id)
    logged: dict[str, int] = field(default_factory=dict)  # metric -> last step the run holds (may be beyond `last`)
    history: Optional[Any] = None  # the run's dense history so far (a DataFrame), for a verdict over the whole run
    status: Optional[str] = None  # the status of the run resumed from (resume_from was a run id)


def resolve_resume(ref: str, tracker_factory: Callable[[], "Tracker"], dest: Path, last_only: bool = False,
                   spool: Optional[Path] = None) -> Resume:
    """``trainer.resume_from``: a checkpoint path (a new run) or an MLflow run id: the same run where it
    did not finish (KILLED, FAILED, RUNNING with its writer dead), a new run continuing it where it did
    (FINISHED: its history is not rewritten; the sweep that summarised it still describes it).
    ``last_only``: the checkpoints (preflight's check), not the steps the run holds.
    ``spool``: where a killed writer of the run may have left records."""
    path = Path(ref)
    if path.exists() or not RUN_ID.match(ref):
        best_path = path.with_name("best.pt")
        best = load_checkpoint(best_path) if best_path.is_file() and best_path != path else None
        return Resume(load_checkpoint(path), best)
    client = tracker_factory().client
    try:
        run = client.get_run(ref)
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: neither a checkpoint file nor a run in the "
                              "tracking store") from None
    if spool is not None:  # continuing it: this process is its only writer from here (refused if not)
        from gradsweep.track.ownership import claim_run, refuse_live_writer

        claim_run(spool, ref)
        refuse_live_writer(spool, run)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        last = client.download_artifacts(ref, "checkpoints/last.pt", str(dest))
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: run has no checkpoints/last.pt artifact") from None
    finished = run.info.status == "FINISHED"
    try:
        best_file = client.download_artifacts(ref, "checkpoints/best.pt", str(dest))
    except Exception:
        best = None
    else:  # there but unreadable: refused like the last checkpoint
        best = load_checkpoint(best_file)
    if last_only:
        return Resume(load_checkpoint(last), best, None if finished else ref, status=run.info.status)
    from gradsweep.track.tracker import metric_history

    from gradsweep.track.history import read_history

    if finished:  # a new run: it holds nothing yet, and its verdict also covers the original's steps
        return Resume(load_checkpoint(last), best, None, history=read_history(client, ref), status=run.info.status)
    if spool is not None:
        from gradsweep.track.ownership import hand_over

        hand_over(spool, ref)
    logged = {key: max(metric_history(client, ref, key)[0], default=-1) for key in run.data.metrics}
    dense = read_history(client, ref)
    if dense is not None:  # the steps it holds beyond its sampled metrics' last point are not sent again
        last_dense = int(dense.index.max())
        logged.update({key: max(logged.get(key, -1), last_dense) for key in dense.columns})
    return Resume(load_checkpoint(last), best, ref, logged, dense, run.info.status)


def check_resume(spec: JobSpec, resume: Resume, data, model: torch.nn.Module) -> None:
    """The checkpoints' whole content against this job (:func:`check_compatible`), with a throwaway
    optimizer and clipper to try their states on."""
    assert spec.trainer.resume_from  # a resume is only resolved for a job that names one
    check_compatible(resume.last, model, build("optimizer", spec.optimizer, model.parameters()),
                     spec.trainer.resume_from, run_length(len(data.train), spec.trainer), build("clip", spec.clip),
                     resume.best)


def continue_history(history: HistorySink, resume: Resume, trainer: Trainer) -> None:
    """A resumed run (in place, or a new run continuing a FINISHED one): the steps before the
    checkpoint, from the resumed run's dense history, so the verdict and ``health/*`` cover the
    whole run, not only the steps after the resume."""
    dense = resume.history
    if dense is None or list(dense.columns) != trainer.names:
        return
    before = dense[dense.index < trainer.step]
    history.define_steps(trainer.names, trainer.total_steps)
    history.log_steps(before.index.to_numpy(dtype=np.int64), before.to_numpy(dtype=np.float32))


def spool_for(spec: JobSpec) -> Optional[Path]:
    """Where a killed writer of the run resumed from may have left records (mlflow backend)."""
    if spec.tracking.backend != "mlflow":
        return None
    from gradsweep.track.mlflow_run import spool_of

    return spool_of(spec.tracking)


def tracker_for(spec: JobSpec) -> "Tracker":
    """The job's tracking store, to read the run it resumes from."""
    from gradsweep.track.tracker import Tracker  # MLflow: only to resume from a run id

    return Tracker(spec.tracking.uri, spec.tracking.experiment_name, spec.tracking.artifact_location)
