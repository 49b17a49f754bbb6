"""Whether this job runs as several tasks of one scheduler step, and which one this process is.

A submitit launcher with ``hydra.launcher.tasks_per_node`` x ``nodes`` = N > 1 runs every job as N
tasks (``srun`` on Slurm, N processes with the local executor); each task calls the job. submitit's
public ``JobEnvironment`` says which task this is. A job that submitit did not start (basic or
joblib launcher, ``python src/train.py``) has no tasks: submitit is not even imported there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from gradsweep.run.ranks import Tasks


def job_tasks(output_dir: Path) -> Optional[Tasks]:
    """This process's place among the tasks of its job, or None (one task, or not a submitit job)."""
    submitit = sys.modules.get("submitit")  # imported by submitit's job runner in every submitit job
    if submitit is None:
        return None
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None
    if env.num_tasks <= 1:
        return None
    # a requeued Slurm job keeps its id: its tasks meet in a folder of their own, not in the last attempt's
    attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
    return Tasks(rank=env.global_rank, local_rank=env.local_rank, world=env.num_tasks,
                 folder=output_dir / f".ranks-{env.job_id}-{attempt}", name=f"{env.cluster} job {env.job_id}")


def launcher_tasks(launcher: Any) -> int:
    """How many tasks a submitit launcher's config runs each job as (1 for any other launcher)."""
    per_node, nodes = launcher.get("tasks_per_node"), launcher.get("nodes")
    return int(per_node or 1) * int(nodes or 1)
