"""File locks shared by the layers: flock, released by the kernel when the holder dies."""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

#: longest wait for another process creating a new SQLite database (MLflow's or Optuna's)
CREATE_WAIT_S = 120.0


class Busy(Exception):
    """Another process holds the lock."""


@contextmanager
def locked_file(path: Path, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive flock on ``path``; Busy after ``wait_s`` seconds."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy(str(path)) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def create_in_turn(make: Callable[[], Any], db: Path) -> Any:
    """``make()`` (which may create and migrate the SQLite database ``db``) while no other of our
    processes does the same for ``db``. MLflow and Optuna create a new database's tables on first
    use and neither guards that against a second process: two at once break it (MLflow: "duplicate
    column name: step", "table latest_metrics already exists", a half-migrated file; Optuna: "UNIQUE
    constraint failed: alembic_version"). A holder stalled for minutes is not waited for."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = locked_file(db.with_name(f".{db.name}.init.lock"), wait_s=CREATE_WAIT_S)
        lock.__enter__()
    except (Busy, OSError):  # a stalled holder, or a folder we may only read (a report from a copy)
        return make()
    try:
        return make()
    finally:
        lock.__exit__(None, None, None)
