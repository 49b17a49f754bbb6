"""Adapter from a Hydra job to :func:`gradsweep.job.run_job` (the only place the job meets Hydra)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from gradsweep.errors import NonFiniteError
from gradsweep.hydra_callback import read_sweep_file
from gradsweep.job import JobContext, JobOutcome, run_job


def context_from_hydra(extra_tags: Optional[dict[str, str]] = None) -> JobContext:
    hc = HydraConfig.get()
    sweep = read_sweep_file() if hc.mode == RunMode.MULTIRUN else None
    return JobContext(
        overrides=list(hc.overrides.task),
        output_dir=Path(hc.runtime.output_dir),
        parent_run_id=sweep["parent_run_id"] if sweep else None,
        sweep_id=sweep["sweep_id"] if sweep else None,
        extra_tags=extra_tags or {},
    )


def run_hydra_job(cfg: DictConfig, on_eval: Optional[Callable[[int, float], None]] = None,
                  extra_tags: Optional[dict[str, str]] = None) -> JobOutcome:
    return run_job(cfg, context_from_hydra(extra_tags), on_eval)


def job_from_hydra(cfg: DictConfig) -> float:
    """Single run: a diverged run is an error (exit 1). Sweep: it is a failed job returning NaN,
    so the sweep goes on (and Optuna records the trial as FAIL)."""
    outcome = run_hydra_job(cfg)
    if isinstance(outcome.error, NonFiniteError) and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise outcome.error
    return outcome.objective if outcome.status == "FINISHED" else math.nan
