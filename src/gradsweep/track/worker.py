"""This process's delivery processes (:class:`DeliveryWorker`, one per spool folder) and whether
this process delivers a run's end itself (:func:`mlflow_loaded`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from gradsweep.paths import SRC
from gradsweep.track.uri import store_kind


def mlflow_loaded() -> bool:
    """Whether this process has MLflow already (a sweep's: its callback and sweeper use it). A single
    job does not: its delivery process creates the run and delivers everything, and the training
    process never spends the seconds importing MLflow takes (benchmarks/startup_speed.py prints
    what a job costs against a bare PyTorch script)."""
    return "mlflow.tracking" in sys.modules


class DeliveryWorker:
    """One delivery process per training process and spool folder (see :mod:`gradsweep.track.delivery`).

    It stops when this process closes its stdin pipe, i.e. also when this process dies."""

    _workers: dict[Path, subprocess.Popen] = {}

    @classmethod
    def alive(cls, spool: Path) -> bool:
        proc = cls._workers.get(spool.resolve())
        return proc is not None and proc.poll() is None

    @classmethod
    def nudge(cls, spool: Path) -> None:
        """Tell this process's delivery process for ``spool`` that a run was opened or has ended:
        it looks at the spool now instead of at its next poll."""
        proc = cls._workers.get(spool.resolve())
        if proc is None or proc.poll() is not None:
            return
        assert proc.stdin is not None  # started with stdin=PIPE
        try:
            proc.stdin.write(b"\n")
            proc.stdin.flush()
        except OSError:  # it has just ended: the caller delivers what is left itself
            pass

    @classmethod
    def ensure(cls, spool: Path, uri: Optional[str] = None) -> None:
        """Start the delivery process for ``spool`` unless it runs; ``uri``: the store it will
        deliver to (it loads that kind of store's code while it waits; the URI itself, which may
        hold a password, is not put on its command line)."""
        spool = spool.resolve()
        proc = cls._workers.get(spool)
        if proc is not None and proc.poll() is None:
            return
        src = str(SRC)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        kind = store_kind(uri) if uri else None
        cls._workers[spool] = subprocess.Popen(
            [sys.executable, "-m", "gradsweep.track.delivery", str(spool), "--owner-pid", str(os.getpid()),
             *(["--store", kind] if kind else [])],
            stdin=subprocess.PIPE, env=env, start_new_session=True)
