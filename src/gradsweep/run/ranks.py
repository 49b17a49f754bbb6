"""Where the ranks of a data-parallel job come from, and what rank 0 can learn of them.

* :class:`Spawned` (``trainer.devices=N``, one process per job): the job's process is rank 0 and
  starts ranks 1..N-1 itself (``torch.multiprocessing``, spawn); they meet in a private temp folder.
  Rank 0 sees their exit codes; each ends when its parent does.
* :class:`Tasks` (N tasks of one scheduler step, ``hydra.launcher.tasks_per_node`` x ``nodes``
  through submitit): the tasks are the ranks, global rank 0 runs the job and nothing is spawned.
  They meet in a folder of the job's output folder (a cluster's shared filesystem, which submitit
  needs anyway). No task sees another's exit code, so each writes a sign of life there every
  :data:`BEAT_S`; rank 0 writes ``end`` there when its job is over, however it ends.

The folder holds the rendezvous file of ``torch.distributed`` (no port to race for), the resume
checkpoint, ``ready-<rank>`` (its host) and ``error-<rank>`` (what stopped a rank, in one line).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from gradsweep.checks import require

if TYPE_CHECKING:
    from gradsweep.run.spec import JobSpec

BEAT_S = 1.0  #: a task's sign of life is rewritten this often
QUIET_S = 3.0  #: a task whose sign did not change for this long, once rank 0's collective failed, is lost
LEAD_QUIET_S = 60.0  #: a task whose rank 0 gave no sign for this long ends (rank 0 killed before it said so)
END, RESUME = "end", "resume.pt"


def check_devices(devices: int, tasks: int) -> None:
    """With N > 1 tasks per job the tasks are the ranks: ``trainer.devices`` is 1 (the default) or N."""
    if tasks > 1:
        require(devices in (1, tasks), "trainer.devices", devices,
                f"1 or {tasks} with {tasks} tasks per job (hydra.launcher.tasks_per_node x nodes: "
                "each task is one rank)")


def ready(folder: Path, rank: int) -> None:
    (folder / f"ready-{rank}").write_text(socket.gethostname())


def failed(folder: Path, rank: int, error: BaseException) -> None:
    from gradsweep.errors import first_line

    try:
        (folder / f"error-{rank}").write_text(f"{type(error).__name__}: {first_line(error, 300, default='')}")
    except OSError:  # the folder is gone: rank 0 ended the job
        pass


def error_of(folder: Path, rank: int) -> Optional[str]:
    path = folder / f"error-{rank}"
    return path.read_text().strip() if path.exists() else None


def host_of(folder: Path, rank: int) -> str:
    path = folder / f"ready-{rank}"
    return path.read_text().strip() if path.exists() else "?"


class Spawned:
    """Ranks 1..N-1 as processes of this job (``trainer.devices=N``)."""

    def __init__(self, world: int):
        self.world = world
        self.label = f"trainer.devices={world}"
        self.folder = Path(tempfile.mkdtemp(prefix="gradsweep-ddp-"))
        self.processes: list[Any] = []

    def start(self, spec: "JobSpec") -> None:
        import torch.multiprocessing as mp

        from gradsweep.run.rank import spawned_rank

        context = mp.start_processes(spawned_rank, args=(self.world, str(self.folder), spec), nprocs=self.world - 1,
                                     join=False, start_method="spawn")
        self.processes = list(context.processes)

    def not_started(self) -> Optional[tuple[int, str]]:
        for rank, proc in enumerate(self.processes, start=1):
            if not proc.is_alive():
                return rank, error_of(self.folder, rank) or f"exit code {proc.exitcode}"
        return None

    def lost(self) -> Optional[str]:
        for _ in range(50):  # the peer's socket closes a moment before its exit status is known
            dead = [(rank, p.exitcode) for rank, p in enumerate(self.processes, start=1) if p.exitcode is not None]
            if dead:
                rank, code = dead[0]
                why = error_of(self.folder, rank) if code > 0 else None
                return f"rank {rank} " + (f"killed by signal {-code}" if code < 0 else f"exited with status {code}") \
                    + (f" ({why})" if why else "")
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        """Stop every rank still running (rank 0 ended: finished, failed, pruned or interrupted)."""
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in self.processes:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class Tasks:
    """This process is task ``rank`` of the ``world`` tasks of one scheduler step that together run
    one job (filled in from submitit's ``JobEnvironment`` by :mod:`gradsweep.sweep.job_tasks`)."""

    rank: int
    local_rank: int  #: on its node: its GPU is ``cuda:<local_rank>``
    world: int
    folder: Path  #: shared by the tasks, in the job's output folder
    name: str  #: e.g. ``slurm job 12_0``

    @property
    def label(self) -> str:
        return f"{self.world} tasks of {self.name}"

    # -------------------------------------------------------------------- rank 0's side
    @contextmanager
    def leading(self) -> Iterator[None]:
        """Rank 0's whole job: its sign of life while it runs; at its end, however it ends, ``end``
        tells the other tasks to stop, and the folder is removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stop = threading.Event()
        threading.Thread(target=_beat, args=(self.folder, 0, stop), daemon=True).start()
        try:
            yield
        finally:
            stop.set()
            self.stop()
            shutil.rmtree(self.folder, ignore_errors=True)

    def start(self, spec: "JobSpec") -> None:
        """Nothing to start: the scheduler started every task."""

    def not_started(self) -> Optional[tuple[int, str]]:
        for rank in range(1, self.world):
            why = error_of(self.folder, rank)
            if why:
                return rank, why
        return None

    def lost(self) -> Optional[str]:
        """The rank that went quiet (no sign of life for QUIET_S: killed, or ended by its own error)."""
        before = {rank: _read_beat(self.folder, rank) for rank in range(1, self.world)}
        time.sleep(QUIET_S)
        for rank in range(1, self.world):
            if _read_beat(self.folder, rank) == before[rank] != "":
                why = error_of(self.folder, rank)
                how = f"failed: {why}" if why else f"stopped: no sign of life for {QUIET_S:.0f} s"
                return f"rank {rank} (on {host_of(self.folder, rank)}) {how}"
        return None

    def stop(self) -> None:
        try:
            (self.folder / END).touch()
        except OSError:
            pass

    # -------------------------------------------------------------------- the other ranks' side
    def watch(self, done: threading.Event) -> None:
        """Rank > 0: write its sign of life; end this process once rank 0 said the job is over (or
        was silent for LEAD_QUIET_S) while this rank still trains or waits for it."""
        lead, lead_since = "", time.monotonic()
        while not done.is_set():
            if (self.folder / END).exists() or not self.folder.is_dir():
                os._exit(0)  # the job's outcome is rank 0's; see exit_with_parent for os._exit
            _write_beat(self.folder, self.rank)
            now = _read_beat(self.folder, 0)
            if now != lead:
                lead, lead_since = now, time.monotonic()
            elif lead and time.monotonic() - lead_since > LEAD_QUIET_S:
                os._exit(1)
            time.sleep(BEAT_S)


def exit_with_parent(done: threading.Event) -> None:
    """A spawned rank whose rank 0 died (even by SIGKILL) would wait in its next all-reduce: end it."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(BEAT_S)
    # os._exit (public, documented): from this watcher thread, end the rank process at once while its
    # main thread is blocked in a collective (sys.exit from a thread only ends the thread)
    os._exit(1)


def _beat(folder: Path, rank: int, stop: threading.Event) -> None:
    while not stop.is_set():
        _write_beat(folder, rank)
        stop.wait(BEAT_S)


def _write_beat(folder: Path, rank: int) -> None:
    try:  # its content, not its time stamp: a reader on another node sees the new content on open
        (folder / f"beat-{rank}").write_text(str(time.monotonic_ns()))
    except OSError:
        pass


def _read_beat(folder: Path, rank: int) -> str:
    try:
        return (folder / f"beat-{rank}").read_text()
    except OSError:
        return ""
