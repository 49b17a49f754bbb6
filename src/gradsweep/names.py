"""The vocabulary: metric names, tag names and identifiers that the loop, the tracker, the sweeps,
the reports, the tests and users all depend on (see DESIGN.md, "Metric-name contract").

Imports nothing: every layer may use it.
"""
from __future__ import annotations

import re

# ------------------------------------------------------------------------------- metrics
TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"
DEV_ACC, DEV_LOSS = "dev/acc", "dev/loss"
TEST_ACC, TEST_LOSS = "test/acc", "test/loss"
BEST_DEV_ACC = "best/dev_acc"  #: the objective a job returns
GRAD_NORM = "grad_norm/"  #: prefix: grad_norm/<param>, grad_norm/total, grad_norm/total_clipped
GRAD_TOTAL = "grad_norm/total"  #: global L2 norm before clipping
GRAD_TOTAL_CLIPPED = "grad_norm/total_clipped"  #: global L2 norm after clipping
CLIP_COEF = "clip/coef"  #: factor applied to the gradients (1.0 = untouched)
CLIP_THRESHOLD = "clip/threshold"  #: adaptive clippers: the global threshold of the step
CLIP_CLIPPED_FRAC = "clip/clipped_frac"  #: unit/tensor-wise clippers: fraction rescaled
AMP_SCALE = "amp/scale"  #: trainer.precision=fp16: the loss scale of the step
AMP_SKIPPED = "amp/skipped"  #: trainer.precision=fp16: 1 when the loss scaler skipped the step (inf/NaN gradients)
HEALTH = "health/"  #: prefix of the end-of-run gradient-health metrics


def grad_norm(param: str) -> str:
    return f"{GRAD_NORM}{param}"


def param_of(metric: str) -> str | None:
    """``grad_norm/rnn.W`` -> ``rnn.W``; None for the totals and for other metrics."""
    if not metric.startswith(GRAD_NORM) or metric in (GRAD_TOTAL, GRAD_TOTAL_CLIPPED):
        return None
    return metric[len(GRAD_NORM):]


# ---------------------------------------------------------------------------------- tags
PARENT_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
OVERRIDES_TAG = "gradsweep.overrides"  #: the run's command-line overrides (passwords masked)
SWEEP_TAG = "gradsweep.sweep_id"  #: every run of one sweep invocation, parent and children
ROLE_TAG = "gradsweep.role"  #: "sweep" on a sweep's parent run
SWEEPER_TAG = "gradsweep.sweeper"
WORKER_TAG = "gradsweep.worker"  #: "host:pid boot=<boot id> start=<ticks>" of the process writing the run
SPOOLED_TAG = "gradsweep.spooled"  #: the run was created late, from its journal
CREATE_KEY_TAG = "gradsweep.create_key"  #: the client's key of the run's create request (track/create.py)
DUPLICATE_OF_TAG = "gradsweep.duplicate_of"  #: a run a retried create made twice: the run kept
STOPPED_TAG, STOPPED_STEP_TAG = "gradsweep.stopped", "gradsweep.stopped_step"  #: pruned (FINISHED early on purpose)
RUN_NAME_TAG = "mlflow.runName"  #: setting it renames the run (a pruned trial's name ends "(pruned)")
NOTE_TAG = "mlflow.note.content"  #: a run's description in the MLflow UI (markdown)
RESUMED_FROM_TAG, RESUMED_AT_TAG = "gradsweep.resumed_from", "gradsweep.resumed_at_step"
FAILURE_TAG, FAILURE_STEP_TAG, FAILURE_REASON_TAG = "failure", "failure_step", "failure_reason"
HEALTH_TAG = "grad_health"  #: ok | comma list of verdicts
HEALTH_REASON_TAG = "grad_health_reason"
STUDY_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.state"
SCHEDULE_TAG, SCHEDULED_AT_TAG = "schedule", "scheduled_at"
#: the folder a run's job (or a sweep's parent: its sweep folder) wrote, absolute: `gradsweep gc` finds
#: by it which local folders hold nothing the store lacks
OUTPUT_DIR_TAG = "gradsweep.output_dir"

# ----------------------------------------------------------------------------- identifiers
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  #: an MLflow run id (as opposed to a checkpoint path)
EXPERIMENT = "gradsweep"  #: default MLflow experiment
EMBEDDED_STORE = "sqlite:///mlruns/mlflow.db"  #: default tracking URI, relative to the working dir
OPTUNA_STORE = "sqlite:///mlruns/optuna.db"  #: default Optuna storage, beside it
