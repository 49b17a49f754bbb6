"""Hydra's submitit launchers for gradsweep sweeps: ``hydra/launcher=slurm`` and ``hydra/launcher=local``
(``conf/hydra/launcher/``), registered with Hydra by its plugin scan of this package.

Why these subclasses exist: hydra-submitit-launcher 1.4.0rc3 collects the jobs of a batch with
``[j.results()[0] for j in jobs]``. A job that ended without a result (``scancel``, killed at its
time limit or by the out-of-memory killer, a node failure) makes ``results()`` raise there, so the
whole launch fails: the sweeper learns nothing of the jobs after it (Hydra's basic sweeper stops
and leaves them running on the cluster; gradsweep's Optuna sweeper tells FAIL for every trial of
the batch, finished ones included) and the sweep dies. Here every job of the batch is waited for,
and one that ended without a result becomes a failed :class:`~hydra.core.utils.JobReturn`
(``JobStatus.FAILED``; its return value a :class:`JobLost` naming the job, its state and its log),
as a job that raised does:

* gradsweep's Optuna sweeper tells the trial FAIL (``gradsweep_failure`` = the reason) and goes on
  with the next batch (``max_failure_rate`` counts it);
* Hydra's basic sweeper raises it once the whole batch has ended, like a job that raised; every
  other job of the batch has finished and recorded by then, and the sweep's callback still writes
  the summary of the MLflow runs;
* the job's MLflow run says itself how it ended: a job ends its run KILLED on the SIGTERM that
  ``scancel`` sends first; the run of one killed outright (SIGKILL, out of memory) is closed KILLED
  with tag ``failure=worker_died`` by the sweep at its end, or by the next sweep, when the job ran on
  the sweep's host (elsewhere by ``gradsweep sync`` there).

A sweep interrupted while it waits (Ctrl-C, SIGTERM) cancels the jobs of the batch that are still
queued or running (the base class leaves them running on the cluster, reporting to Optuna trials
already told FAIL) and waits for them to close their runs KILLED. A lost job is noticed within
``STATE_POLL_S``: submitit alone asks the scheduler ever more rarely, up to 10 minutes apart.

A job run as several tasks (``hydra.launcher.tasks_per_node`` x ``nodes`` > 1: its ranks,
:mod:`gradsweep.run.parallel`) returns task 0's result, as the base class does, but only task 0's:
a rank killed mid-run leaves no result of its own, and rank 0's says how the job ended (its run FAILED,
naming the rank).

Also, each job gets the sweep's :class:`~gradsweep.sweep.context.SweepContext` as a Hydra
``hydra.job.env_set`` override, as gradsweep's Optuna sweeper gives each trial its own: a job finds
its sweep's parent run through its own config (kept in its ``.hydra/hydra.yaml``), not only through
the environment that sbatch passes on by a default a site may change (``SBATCH_EXPORT``).

Hydra imports this module at every start: it imports nothing heavy (submitit only in ``launch``).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import OmegaConf

from gradsweep.compat.submitit import shorten_result_wait
from gradsweep.errors import JobLost
from gradsweep.sweep.context import ENV, SweepContext

log = logging.getLogger(__name__)

# Scheduler states of a job that is over and may have left no result (Slurm's, then submitit's local executor's).
ENDED_WITHOUT_RESULT = ("CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                        "PREEMPTED", "REVOKED", "INTERRUPTED", "NO PROCESS")
# submitit waits 15 s for the result file of a job that is over (a slow shared filesystem may show
# it late); for a job in one of the states above there is none to wait for, and the batch would
# wait 15 s per such job.
LOST_RESULT_WAIT_S = 2
# While a job has no result yet, submitit asks the scheduler (sacct) for its state ever more rarely:
# every elapsed/2 seconds, up to 10 minutes apart, so a job cancelled a few seconds into a sweep was
# noticed 15-30 s late, one cancelled an hour in up to 10 minutes late. Asked at least this often
# instead: one sacct call for all of the sweep's jobs every 5 s while it waits (Nextflow polls its
# grid schedulers as often).
STATE_POLL_S = 5
# A sweep interrupted (Ctrl-C, SIGTERM) cancels its jobs and waits this long for them to end
# (slurm.conf's KillWait, 10 s in deploy/slurm, is when Slurm kills what is left).
CANCEL_WAIT_S = 20


class _CollectEveryJob:
    """``launch`` of :class:`BaseSubmititLauncher`, with the sweep context added to each job and
    every job's outcome collected (see the module docstring)."""

    _EXECUTOR: str
    params: dict[str, Any]
    config: Any

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit  # lazy: plugin discovery stays fast

        assert self.config is not None
        assert len(job_overrides) > 0
        # --- the base class's executor set-up, unchanged
        init_params = {"folder": self.params["submitit_folder"]}
        specific_init_keys = {"max_num_timeout", "python"}
        init_params.update(**{f"{self._EXECUTOR}_{x}": y for x, y in self.params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                                      for x, y in self.params.items() if x not in init_keys})
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        context = SweepContext.current()
        job_params: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            overrides = list(overrides)
            log.info(f"\t#{idx} : {' '.join(o for o in filter_overrides(overrides) if f'env_set.{ENV}=' not in o)}")
            if context is not None and not any(f"hydra.job.env_set.{ENV}=" in o for o in overrides):
                overrides.append(context.job_override())  # an Optuna trial has its own already
            job_params.append((overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))

        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        # --- ours: wait for every job, and turn "no result" into a failed job
        try:
            return [self._outcome(job, params[0], params[2]) for job, params in zip(jobs, job_params, strict=True)]
        except BaseException:  # Ctrl-C or SIGTERM of the sweep: its jobs must not run on without it
            live = [job for job in jobs if not job.done()]
            log.warning("cancelling the %d unfinished job(s) of this batch; waiting up to %d s for them to "
                        "close their runs", len(live), CANCEL_WAIT_S)
            for job in live:
                job.cancel(check=False)  # scancel: SIGTERM, the job ends its run KILLED
            deadline = time.monotonic() + CANCEL_WAIT_S  # so the sweep's summary finds them closed
            while live and time.monotonic() < deadline:
                time.sleep(1)
                live = [job for i, job in enumerate(live) if not job.done(force_check=i == 0)]
            raise

    def _outcome(self, job: Any, overrides: list[str], idx: int) -> JobReturn:
        from submitit.core.utils import UncompletedJobError  # FailedJobError is one too

        asked = time.monotonic()
        while True:  # job.wait(), asking the scheduler at least every STATE_POLL_S
            force = time.monotonic() - asked >= STATE_POLL_S
            if force:
                asked = time.monotonic()
            if job.done(force_check=force):
                break
            time.sleep(1)
        state = str(job.state)
        lead = job.task(0)  # a job run as several tasks (tasks_per_node x nodes): task 0 is its rank 0, its result
        if state.upper().startswith(ENDED_WITHOUT_RESULT):  # the job's, whatever the other tasks left
            shorten_result_wait(lead, LOST_RESULT_WAIT_S)
        try:
            return lead.results()[0]
        except UncompletedJobError as e:
            crashed = "failed during processing" in str(e)  # submitit's FailedJobError: raised outside Hydra's job
            reason = (f"job #{idx} ({self._EXECUTOR} job {job.job_id}) "
                      + ("raised outside the Hydra job" if crashed else f"ended {state} without a result")
                      + (f"; its log: {job.paths.stderr}" if job.paths.stderr.exists() else "; it left no log"))
            log.error(reason)
            visible = [o for o in overrides if f"env_set.{ENV}=" not in o]
            return JobReturn(overrides=visible, status=JobStatus.FAILED, _return_value=JobLost(reason),
                             task_name=str(self.config.hydra.job.name))


class GradsweepSlurmLauncher(_CollectEveryJob, SlurmLauncher):
    """``hydra/launcher=slurm``: jobs as a Slurm job array (``conf/hydra/launcher/slurm.yaml``)."""


class GradsweepLocalLauncher(_CollectEveryJob, LocalLauncher):
    """``hydra/launcher=local``: jobs as local processes through submitit, all of a batch at once
    (``conf/hydra/launcher/local.yaml``)."""
