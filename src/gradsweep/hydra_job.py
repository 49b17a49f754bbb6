"""Adapter from a Hydra job to :func:`gradsweep.job.run_job` (the only place the job meets Hydra)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gradsweep.errors import NonFiniteError, StopRun
from gradsweep.hydra_callback import read_sweep_file
from gradsweep.job import JobContext, JobOutcome, run_job


def context_from_hydra(extra_tags: Optional[dict[str, str]] = None) -> JobContext:
    hc = HydraConfig.get()
    sweep = read_sweep_file() if hc.mode == RunMode.MULTIRUN else None
    return JobContext(
        overrides=list(hc.overrides.task),
        output_dir=Path(hc.runtime.output_dir),
        parent_run_id=sweep.get("parent_run_id") if sweep else None,
        parent_local_id=sweep.get("parent_local_id") if sweep else None,
        sweep_id=sweep["sweep_id"] if sweep else None,
        extra_tags=extra_tags or {},
    )


def run_hydra_job(cfg: DictConfig, on_eval: Optional[Callable[[int, float], None]] = None,
                  extra_tags: Optional[dict[str, str]] = None) -> JobOutcome:
    return run_job(cfg, context_from_hydra(extra_tags), on_eval)


def trial_from_env():
    """The job's Optuna trial (:mod:`gradsweep.optuna_trial`); Optuna is imported only in its sweeps."""
    if not os.environ.get("GRADSWEEP_OPTUNA_TRIAL_ID"):
        return None
    from gradsweep.optuna_trial import trial_from_env as from_env

    return from_env()


def job_from_hydra(cfg: DictConfig) -> float:
    """Single run: a diverged run is an error (exit 1). Sweep: it is a failed job returning NaN,
    so the sweep goes on (and Optuna records the trial as FAIL)."""
    trial = trial_from_env()  # the Optuna trial when gradsweep's Optuna sweeper launched this job
    outcome = run_hydra_job(cfg, trial.on_eval if trial else None, trial.tags if trial else None)
    if isinstance(outcome.error, StopRun):
        raise outcome.error  # pruned: the sweeper tells Optuna PRUNED
    if isinstance(outcome.error, NonFiniteError) and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise outcome.error
    return outcome.objective if outcome.status == "FINISHED" else math.nan
