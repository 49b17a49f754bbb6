"""Scheduled sweeps: run a named sweep once (``gradsweep sweep run``) or whenever its cron schedule
is due (``gradsweep schedule``).

* A sweep in ``sweeps/<name>.yaml`` may carry ``schedule: {cron, timezone, trials_per_run}``.
  Each run continues the sweep's Optuna study with ``trials_per_run`` more trials; its MLflow
  parent run is tagged ``schedule=<name>`` and ``scheduled_at=<time>``.
* The same sweep never runs twice at once: a run holds a lock for its whole duration, in the
  study's PostgreSQL database when the study lives there (an advisory lock, shared by every host)
  and else in a lock file (``mlruns/locks``). Both are released by the operating system or the
  database when the holder dies, so a killed process never leaves a stale lock.
* Runs missed while no scheduler was up coalesce into one run at start-up.
* SIGTERM / Ctrl-C: the running sweep is told to stop (its trial ends KILLED in MLflow and FAIL in
  Optuna), then the scheduler exits.

Cron parsing and timing are APScheduler's (``CronTrigger``).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Optional

from gradsweep.errors import ConfigError, GradsweepError, first_line
from gradsweep.locks import Busy, hold, locked_file, release
from gradsweep.paths import TRAIN
from gradsweep.names import SCHEDULE_TAG, SCHEDULED_AT_TAG
from gradsweep.sweep.context import SweepContext
from gradsweep.track.uri import absolute_sqlite, is_local_sqlite, refuse_password, sqlite_path

log = logging.getLogger("gradsweep.sweep.schedule")
STORAGE_ENV = "GRADSWEEP_OPTUNA_STORAGE"  # overrides every sweep's study storage (team deployments)


class SweepBusy(GradsweepError):
    """The sweep is already running somewhere (the lock is held)."""


@dataclass
class Schedule:
    sweep: str
    cron: str
    timezone: str = "UTC"
    trials_per_run: int = 5
    enabled: bool = True

    def trigger(self):
        return cron_trigger(self.cron, self.timezone, key=f"sweeps/{self.sweep}.yaml: schedule.cron")


def cron_trigger(expr: str, tz: str = "UTC", key: str = "schedule.cron"):
    """APScheduler's CronTrigger from 5 crontab fields, or 6 with seconds first (``*/5 * * * * *``)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expr, timezone=tz)
        if len(fields) == 6:
            names = ("second", "minute", "hour", "day", "month", "day_of_week")
            return CronTrigger(**dict(zip(names, fields, strict=True)), timezone=tz)
    except (ValueError, KeyError, LookupError) as e:
        raise ConfigError(f"{key}={expr!r} (timezone {tz!r}) is invalid: {e}; allowed: a crontab expression "
                          "with 5 fields (or 6, seconds first) and an IANA time zone") from None
    raise ConfigError(f"{key}={expr!r} has {len(fields)} fields; allowed: 5 (minute hour day month weekday) "
                      "or 6 (seconds first)")


# ------------------------------------------------------------------------------ sweep files
def sweeps_dir() -> Path:
    from gradsweep.sweep.sources import sweeps_dir as folder

    return folder()


def sweep_names() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml"))


def load_sweep(name: str) -> dict:
    """The sweep's YAML as a plain dict (its schedule and study settings; not a composed job)."""
    import yaml

    path = sweeps_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"sweep={name!r} not found in {sweeps_dir()}; allowed: {'|'.join(sweep_names()) or '(none)'}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:  # a tab, a !!python tag, an unclosed quote: the file and line, not a traceback
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"sweeps/{name}.yaml is not valid YAML: {why}{where}; allowed: plain YAML (spaces, "
                          "not tabs; no !!python tags)") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"sweeps/{name}.yaml holds a {type(raw).__name__}; allowed: a mapping of config keys")
    return raw or {}


def load_schedule(name: str) -> Optional[Schedule]:
    raw = load_sweep(name).get("schedule")
    if not raw:
        return None
    allowed = set(Schedule.__dataclass_fields__) - {"sweep"}
    unknown = set(raw) - allowed
    if unknown or "cron" not in raw:
        raise ConfigError(f"sweeps/{name}.yaml: schedule keys {sorted(raw)}; allowed: {'|'.join(sorted(allowed))} "
                          "(cron required)")
    sched = Schedule(sweep=name, **raw)
    for key in ("cron", "timezone"):  # YAML reads `cron: 5` as an integer
        value = getattr(sched, key)
        if not isinstance(value, str):
            example = '"*/30 * * * *"' if key == "cron" else "Europe/Berlin"
            raise ConfigError(f"sweeps/{name}.yaml: schedule.{key}={value!r} is a {type(value).__name__}; allowed: "
                              f"a quoted string, e.g. {key}: {example}")
    if not isinstance(sched.trials_per_run, int) or isinstance(sched.trials_per_run, bool) or sched.trials_per_run < 1:
        raise ConfigError(f"sweeps/{name}.yaml: schedule.trials_per_run={sched.trials_per_run!r}; "
                          "allowed: an integer >= 1")
    if not isinstance(sched.enabled, bool):
        raise ConfigError(f"sweeps/{name}.yaml: schedule.enabled={sched.enabled!r}; allowed: true|false")
    trigger = sched.trigger()  # validates cron and time zone
    if trigger.get_next_fire_time(None, datetime.now(timezone.utc)) is None:
        raise ConfigError(f"sweeps/{name}.yaml: schedule.cron={sched.cron!r} never fires (no such date); allowed: "
                          "a crontab expression that names a real date")
    return sched


def study_storage(name: str) -> Optional[str]:
    return os.environ.get(STORAGE_ENV) or ((load_sweep(name).get("hydra") or {}).get("sweeper") or {}).get("storage")


# ------------------------------------------------------------------------------------ locks
@contextmanager
def sweep_lock(name: str, storage: Optional[str], lock_dir: Optional[Path] = None) -> Iterator[None]:
    """Held for a whole sweep run, keyed to what every scheduler of the study shares, wherever it was
    started from. PostgreSQL study storage: a session advisory lock in that database (every host sees
    it). A study file (sqlite, journal): flock beside that file. No storage: flock in ``lock_dir``
    (default: this user's cache folder, per host)."""
    if storage and storage.startswith("postgresql"):
        with _pg_lock(name, storage):
            yield
        return
    try:
        fd = hold(lock_path(name, storage, lock_dir or default_lock_dir()))  # the file names its holder
    except Busy as e:
        raise SweepBusy(f"sweep {name!r} is already running ({e}); not starting it again") from None
    try:
        yield
    finally:
        release(fd)  # closing it releases the flock


def default_lock_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradsweep" / "locks"


def lock_path(name: str, storage: Optional[str], lock_dir: Path) -> Path:
    """The lock file of sweep ``name``: beside its study file, else in ``lock_dir``."""
    url = str(storage or "")
    study_file = None
    if is_local_sqlite(url):
        study_file = sqlite_path(absolute_sqlite(url))
    elif url.startswith("journal:"):
        study_file = Path(url[len("journal:"):].removeprefix("//")).absolute()
    if study_file is not None:
        return study_file.with_name(f".{study_file.name}.{name}.sweep.lock")
    return lock_dir / f"{name}.lock"


@contextmanager
def _pg_lock(name: str, storage: str) -> Iterator[None]:
    import sqlalchemy

    from gradsweep.sweep.optuna_storage import resolve_storage_url  # the same driver choice as the study's

    key = zlib.crc32(f"gradsweep-sweep:{name}".encode())
    engine = sqlalchemy.create_engine(resolve_storage_url(storage) or storage, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        got = conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        if not got:
            raise SweepBusy(f"sweep {name!r} is already running (advisory lock {key} held in its study database)")
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    engine.dispose()


# --------------------------------------------------------------------------------- one run
class SweepRunner:
    """Runs ``python src/train.py -m +sweep=<name>`` under the sweep's lock; forwards SIGTERM."""

    def __init__(self, lock_dir: Optional[Path] = None, extra_overrides: Optional[list[str]] = None):
        self.lock_dir = lock_dir
        self.extra_overrides = extra_overrides or []
        self.proc: Optional[subprocess.Popen] = None
        self.stopping = threading.Event()

    def run(self, name: str, trials: Optional[int] = None, schedule: Optional[str] = None,
            scheduled_at: Optional[datetime] = None) -> int:
        load_sweep(name)  # clear error for an unknown sweep
        storage = study_storage(name)
        overrides = ["-m", f"+sweep={name}", *self.extra_overrides]
        if trials is not None:
            overrides.append(f"hydra.sweeper.n_trials={trials}")
        if os.environ.get(STORAGE_ENV):
            refuse_password(STORAGE_ENV, os.environ[STORAGE_ENV])
            overrides.append(f"hydra.sweeper.storage={os.environ[STORAGE_ENV]}")
        tags = {SCHEDULE_TAG: schedule, SCHEDULED_AT_TAG: scheduled_at.isoformat()} if schedule and scheduled_at else {}
        with sweep_lock(name, storage, self.lock_dir):
            if self.stopping.is_set():
                return 130
            log.info("sweep %s: starting (%s trials)%s", name, trials or "configured",
                     f", scheduled at {scheduled_at.isoformat()}" if scheduled_at else "")
            env = {**os.environ, **SweepContext(parent_tags=tags).env()}
            self.proc = subprocess.Popen([sys.executable, str(TRAIN), *overrides], env=env,
                                         preexec_fn=_die_with_parent)
            code = self.proc.wait()
            self.proc = None
        log.info("sweep %s: ended with exit status %d", name, code)
        return code

    def terminate(self) -> None:
        """Ask the running sweep to stop (its trial ends KILLED in MLflow, FAIL in Optuna); returns at
        once, so it is safe in a signal handler (waiting there would deadlock with Popen.wait)."""
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 120) -> None:
        """terminate() and wait for the sweep to end (not from a signal handler)."""
        self.terminate()
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent() -> None:
    """If this scheduler is SIGKILLed, its sweep gets SIGTERM rather than running on unlocked."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ------------------------------------------------------------------------------- scheduler
class StateFile:
    """When each schedule last ran (to detect runs missed while no scheduler was up)."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, name: str) -> Optional[datetime]:
        try:
            value = json.loads(self.path.read_text()).get(name)
        except (OSError, ValueError):
            return None
        return datetime.fromisoformat(value) if value else None

    def set(self, name: str, when: datetime) -> None:
        """Read-modify-write under a lock: two schedulers in one folder update it at the same moment."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with locked_file(self.path.with_name(self.path.name + ".lock"), wait_s=30):
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}
            data[name] = when.isoformat()
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)


def missed_runs(sched: Schedule, last: Optional[datetime], now: datetime, limit: int = 1000) -> int:
    """How many fire times of the schedule fell after ``last`` and up to ``now``."""
    if last is None:
        return 0
    trigger, count, t = sched.trigger(), 0, last
    while count < limit:
        t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))  # the next fire time after t
        if t is None or t > now:
            break
        count += 1
    return count


class Scheduler:
    def __init__(self, names: Optional[list[str]] = None, state_dir: Path = Path("mlruns"),
                 max_runs: Optional[int] = None, extra_overrides: Optional[list[str]] = None):
        self.schedules, errors = [], []
        for name in names or sweep_names():
            try:
                sched = load_schedule(name)
            except ConfigError as e:  # one bad file does not stop the others' schedules
                errors.append(e)
                continue
            if sched and sched.enabled:
                self.schedules.append(sched)
        if errors and not self.schedules:
            raise errors[0] if len(errors) == 1 else ConfigError(
                f"no valid scheduled sweep: {len(errors)} sweep files are invalid, the first: {errors[0]}")
        for err in errors:
            log.error("%s; that sweep is not scheduled, the others are", err)
        if not self.schedules:
            raise ConfigError(f"no sweep in {sweeps_dir()} has an enabled schedule; add 'schedule: {{cron: ...}}'"
                              " to a sweep file")
        self.state = StateFile(state_dir / "schedules" / "state.json")
        self.runner = SweepRunner(extra_overrides=extra_overrides)
        self.max_runs = max_runs  # stop after this many runs in all (tests, one-off catch-up)
        self.runs = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def _run(self, sched: Schedule, scheduled_at: datetime) -> None:
        if self.done.is_set():
            return
        self.state.set(sched.sweep, scheduled_at)
        try:
            self.runner.run(sched.sweep, sched.trials_per_run, sched.sweep, scheduled_at)
        except SweepBusy as e:
            log.warning("%s", e)
        with self._lock:
            self.runs += 1
            if self.max_runs is not None and self.runs >= self.max_runs:
                self.done.set()

    def start(self) -> int:
        from apscheduler.schedulers.background import BackgroundScheduler

        bg = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None})
        now = datetime.now(timezone.utc)
        for sched in self.schedules:
            last = self.state.get(sched.sweep)
            missed = missed_runs(sched, last, now)
            if missed and last is not None:
                log.warning("sweep %s: %d scheduled run(s) missed since %s; coalescing them into one run now",
                            sched.sweep, missed, last.isoformat())
                bg.add_job(self._run, args=(sched, now), id=f"{sched.sweep}-catch-up")
            elif self.state.get(sched.sweep) is None:
                self.state.set(sched.sweep, now)  # first start: nothing was missed
            bg.add_job(lambda s=sched: self._run(s, datetime.now(timezone.utc)), trigger=sched.trigger(),
                       id=sched.sweep)
            log.info("sweep %s: cron %r (%s), %d trials per run", sched.sweep, sched.cron, sched.timezone,
                     sched.trials_per_run)
        stop = lambda *_: self.done.set()  # noqa: E731
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        bg.start()
        try:
            self.done.wait()
        finally:
            log.info("scheduler stopping")
            self.runner.stop()
            bg.shutdown(wait=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0
