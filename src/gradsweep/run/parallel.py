"""``trainer.devices=N``: one job over N processes, started by the job itself.

The job's own process is rank 0: it records, evaluates and checkpoints. It spawns ranks 1..N-1
(``torch.multiprocessing``, spawn), each of which builds the same model, data, optimizer and
clipping rule from the job's validated config, restores the same checkpoint when the job resumes,
joins the process group (gloo on CPU, NCCL on CUDA, rendezvous through a file in a private temp
folder: no port to race for) and trains its share of every batch. Because the job launches its own
ranks, every launcher that runs a job (basic, joblib, Slurm through submitit) runs a parallel one.

Failure never hangs: rank 0 waits for the other ranks to be ready while watching them (a rank that
fails to start fails the job in one line); a rank killed while training breaks rank 0's next
all-reduce, which fails the run; the other ranks end when rank 0's process does (a watchdog on
their parent) or when it stops them at the end of the run.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradsweep.errors import GradsweepError, RankLost, first_line
from gradsweep.train.parallel import DataParallel

if TYPE_CHECKING:
    from gradsweep.run.spec import JobSpec

log = logging.getLogger("gradsweep")
READY_TIMEOUT_S = 300.0
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # rank 0 may evaluate a large dev set while the others wait


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class Ranks:
    """Ranks 1..N-1 of a job, running; rank 0 (this process) in the process group."""

    def __init__(self, spec: "JobSpec", device: torch.device, resume_state: Optional[dict]):
        self.world = spec.trainer.devices
        self.folder = Path(tempfile.mkdtemp(prefix="gradsweep-ddp-"))
        resume_file = None
        if resume_state is not None:
            resume_file = str(self.folder / "resume.pt")
            torch.save(resume_state, resume_file)
        self.context = mp.start_processes(_rank_main, args=(self.world, str(self.folder), spec, resume_file),
                                          nprocs=self.world - 1, join=False, start_method="spawn")
        try:
            self._wait_ready()
            dist.init_process_group(backend_for(device), init_method=f"file://{self.folder / 'rendezvous'}",
                                    rank=0, world_size=self.world, timeout=COLLECTIVE_TIMEOUT)
        except BaseException:
            self.close()
            raise
        self.parallel = DataParallel(0, self.world)
        log.info("data parallel over %d processes (%s)", self.world, backend_for(device))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            ready = {p.name for p in self.folder.glob("ready-*")}
            if len(ready) == self.world - 1:
                return
            for rank, proc in enumerate(self.context.processes, start=1):
                if not proc.is_alive():
                    error = self.folder / f"error-{rank}"
                    why = error.read_text().strip() if error.exists() else f"exit code {proc.exitcode}"
                    raise GradsweepError(f"trainer.devices={self.world}: rank {rank} did not start: {why}")
            if time.monotonic() > deadline:
                raise GradsweepError(f"trainer.devices={self.world}: the other ranks were not ready after "
                                     f"{READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def lost(self, error: Exception) -> Exception:
        """``error`` (what rank 0's collective raised) as :class:`RankLost` naming the rank that died,
        or unchanged when every rank is alive (then it is rank 0's own error)."""
        for _ in range(50):  # the peer's socket closes a moment before its exit status is known
            dead = [(rank, p.exitcode) for rank, p in enumerate(self.context.processes, start=1)
                    if p.exitcode is not None]
            if dead:
                break
            time.sleep(0.1)
        else:
            return error
        rank, code = dead[0]
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return RankLost(f"trainer.devices={self.world}: rank {rank} {how} while training; the run is FAILED "
                        f"({type(error).__name__} on rank 0: {first_line(error, 200, default='')})")

    def close(self) -> None:
        """Stop every rank still running (rank 0 ended: finished, failed, pruned or interrupted)."""
        for proc in self.context.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in self.context.processes:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.folder, ignore_errors=True)


def _rank_main(index: int, world: int, folder: str, spec: "JobSpec", resume_file: Optional[str]) -> None:
    """Rank ``index + 1``: the job's model and data, its share of every step, no records."""
    rank = index + 1
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        from gradsweep.run.inputs import data_and_model
        from gradsweep.run.job import device_for
        from gradsweep.train.checkpoints import load_checkpoint
        from gradsweep.train.loop import Trainer
        from gradsweep.train.registry import build
        from gradsweep.train.sinks import NullSink

        if spec.trainer.cpu_threads:
            torch.set_num_threads(spec.trainer.cpu_threads)
        torch.manual_seed(spec.trainer.seed)
        data, model = data_and_model(spec)
        device = rank_device(device_for(spec.trainer.device), rank)
        model.to(device)
        optimizer = build("optimizer", spec.optimizer, model.parameters())
        clipper = build("clip", spec.clip)
        state = load_checkpoint(resume_file) if resume_file else None
    except BaseException as e:
        Path(folder, f"error-{rank}").write_text(f"{type(e).__name__}: {e}")
        raise
    Path(folder, f"ready-{rank}").touch()
    dist.init_process_group(backend_for(device), init_method=f"file://{Path(folder) / 'rendezvous'}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    trainer = Trainer(model, data, optimizer, clipper, spec.trainer, NullSink(), device,
                      parallel=DataParallel(rank, world))
    if state is not None:
        trainer.restore(state)
    trainer.run()
    dist.destroy_process_group()


def _exit_with_parent(parent: int) -> None:
    """A rank whose rank 0 died (even by SIGKILL) would wait in its next all-reduce: end it."""
    while os.getppid() == parent:
        time.sleep(1.0)
    # os._exit (public, documented): from this watcher thread, end the rank process at once while its
    # main thread is blocked in a collective (sys.exit from a thread only ends the thread)
    os._exit(1)
