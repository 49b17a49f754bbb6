"""One job over N ``torch.distributed`` processes: rank 0 records, evaluates and checkpoints; ranks
1..N-1 train their share of every batch (:mod:`gradsweep.run.rank`) and record nothing.

The ranks come from one of two places (:mod:`gradsweep.run.ranks`):

* ``trainer.devices=N``: the job's process is rank 0 and spawns ranks 1..N-1 itself, so every
  launcher that runs a job (basic, joblib, Slurm or local through submitit with one task per job)
  runs a parallel one;
* ``hydra.launcher.tasks_per_node`` x ``nodes`` = N > 1 (submitit, Slurm or local): the N tasks of
  the job's step are its ranks. Global rank 0 runs the job as a one-task job does and its result is
  the job's; the others run the rank body; nothing is spawned. ``trainer.devices`` is then 1 or N
  (:func:`~gradsweep.run.ranks.check_devices`, at preflight and in the job). A rank's GPU is
  ``cuda:<local rank>``.

Either way rank 0 writes the resume checkpoint where the ranks meet, waits for them to be ready
while watching for one that failed to start (one line naming it), and joins the process group
(gloo on CPU, NCCL on CUDA, rendezvous through a file: no port to race for).

Failure never hangs: a rank killed while training breaks rank 0's next all-reduce, which fails the
run with a one-line reason naming the rank (:meth:`Ranks.lost`); the other ranks end when rank 0
stops them at the end of its job, however it ends, or when rank 0's process is gone.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist

from gradsweep.errors import GradsweepError, RankLost, first_line
from gradsweep.run.rank import COLLECTIVE_TIMEOUT_MIN, backend_for, rendezvous
from gradsweep.run.ranks import RESUME, Spawned, Tasks
from gradsweep.train.parallel import DataParallel

if TYPE_CHECKING:
    from gradsweep.run.spec import JobSpec

log = logging.getLogger("gradsweep")
READY_TIMEOUT_S = 300.0


class Ranks:
    """Ranks 1..N-1 of a job, training; rank 0 (this process) in the process group with them."""

    def __init__(self, spec: "JobSpec", device: torch.device, resume_state: Optional[dict],
                 source: Union[Spawned, Tasks]):
        self.source, self.world, self.folder = source, source.world, source.folder
        try:
            if resume_state is not None:  # before rank 0 joins: a rank reads it once the group is complete
                torch.save(resume_state, self.folder / RESUME)
            source.start(spec)
            self._wait_ready()
            dist.init_process_group(backend_for(device), init_method=rendezvous(self.folder), rank=0,
                                    world_size=self.world, timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
        except BaseException:
            self.close()
            raise
        self.parallel = DataParallel(0, self.world)
        log.info("data parallel over %d processes (%s, %s)", self.world, source.label, backend_for(device))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(list(self.folder.glob("ready-*"))) < self.world - 1:
            dead = self.source.not_started()
            if dead is not None:
                raise GradsweepError(f"{self.source.label}: rank {dead[0]} did not start: {dead[1]}")
            if time.monotonic() > deadline:
                raise GradsweepError(f"{self.source.label}: the other ranks were not ready after "
                                     f"{READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def lost(self, error: Exception) -> Exception:
        """``error`` (what rank 0's collective raised) as :class:`RankLost` naming the rank that died,
        or unchanged when every rank is alive (then it is rank 0's own error)."""
        why = self.source.lost()
        if why is None:
            return error
        return RankLost(f"{self.source.label}: {why} while training; the run is FAILED "
                        f"({type(error).__name__} on rank 0: {first_line(error, 200, default='')})")

    def close(self) -> None:
        """Stop the other ranks (rank 0 ended: finished, failed, pruned or interrupted)."""
        self.source.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
