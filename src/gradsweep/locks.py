"""Files more than one process may write, shared by the layers: flock locks (released by the kernel
when the holder dies), locks held for a process's life that say who holds them, and temporary
names no other writer shares."""
from __future__ import annotations

import fcntl
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

#: held in a job's or sweep's folder by the process writing it (gradsweep.run.job.hold_folder)
FOLDER_LOCK = ".gradsweep.lock"
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


# ------------------------------------------------------------------------------ owners
def temporary_name(path: Path) -> Path:
    """A name beside ``path`` for writing it before ``os.replace``: of this writer alone, so two
    processes writing the same file never rename each other's half-written data."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def hold(path: Path, holder: str = "") -> int:
    """Take the exclusive flock of ``path`` without waiting and keep it: the returned descriptor
    holds it until :func:`release` or until this process ends, however it ends (the kernel
    releases it). ``holder`` is written into the file for whoever is refused (:func:`holder_of`).
    Busy (with the holder's note) if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(describe(holder_of(path)) or "another process") from None
        if _still_named(fd, path):
            break
        os.close(fd)  # its holder removed the file meanwhile (drop_unheld): the lock is the new file's
    os.ftruncate(fd, 0)
    os.write(fd, (holder or process_id()).encode())
    return fd


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def drop_unheld(folder: Path, pattern: str = "*.lock") -> list[Path]:
    """Remove the lock files in ``folder`` that no process holds (:func:`hold`), each while holding
    it: a process taking it meanwhile finds it removed and takes a new file (:func:`hold`). Returns
    what was removed."""
    removed = []
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else ():
        try:
            fd = hold(path)
        except (Busy, OSError):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            release(fd)
    return removed


def release(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def holder_of(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def is_held(path: Path) -> Optional[bool]:
    """Whether a live process holds ``path``'s flock (:func:`hold`); None when there is no such file.
    A probe only: the lock is taken and dropped at once, never waited for."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot of the kernel: a PID recorded before a reboot names nobody now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int | str = "self") -> Optional[int]:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat): with
    the PID it names one process, where a PID alone may be reused or seen from another PID namespace."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_id() -> str:
    """This process as its owner records it: ``host:pid boot=<boot id> start=<ticks>``."""
    return f"{socket.gethostname()}:{os.getpid()} boot={boot_id()} start={start_ticks()}"


def parse_owner(owner: str) -> tuple[str, str, dict[str, str]]:
    """An owner string (:func:`process_id`, or a bare ``host:pid``) as (host, pid, {boot, start}); empty
    strings for what it lacks."""
    first, *rest = owner.split() or [""]
    host, _, pid = first.rpartition(":")
    return host, pid, dict(f.partition("=")[::2] for f in rest)


def describe(owner: str) -> str:
    """An owner string (:func:`process_id`) for people: ``pid 123 on host``."""
    host, pid, _ = parse_owner(owner)
    return f"pid {pid} on {host}" if host and pid else owner


def process_state(owner: str) -> Optional[bool]:
    """Whether the process an owner string (:func:`process_id`, or a bare ``host:pid``) names is alive:
    True or False where this host can tell, None where it cannot (another host). Where a lock the
    owner holds can be seen, ask that instead (:func:`is_held`): this is for where it cannot."""
    host, pid, fields = parse_owner(owner)
    if host != socket.gethostname() or not pid.isdigit():
        return None
    if fields.get("boot") and boot_id() and fields["boot"] != boot_id():
        return False  # recorded before a reboot
    start = fields.get("start")
    if not start or not start.isdigit():  # an owner recorded by an older version: the PID is all there is
        return pid_alive(int(pid))
    if start_ticks(pid) == int(start):
        return True
    # the PID is another process's now, or it was seen from inside a PID namespace (a container
    # records its own numbering): look for a process that started then and has that PID in its namespace
    try:
        entries = list(os.scandir("/proc"))
    except OSError:  # no procfs: the PID is all there is
        return pid_alive(int(pid))
    return any(e.name.isdigit() and start_ticks(e.name) == int(start) and _ns_pid(e.name) == pid for e in entries)


def _ns_pid(pid: str) -> Optional[str]:
    """A process's PID in its innermost PID namespace (the last field of NSpid in /proc/<pid>/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return line.split()[-1]
    except OSError:
        pass
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has ``pid`` (one of another user's counts as alive)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
