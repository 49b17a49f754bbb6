"""Delivery of run journals (:mod:`gradsweep.track.journal`) to the tracking store.

``deliver(folder)`` sends whatever a journal holds beyond its recorded offset, in journal order
(so metrics arrive in step order), metrics batched by ``log_batch`` up to 1000 per request, and
moves the offset after every successful request. A request that fails because the store is
unreachable stops the pass; the next pass resumes at the same offset. Re-sending a batch whose
offset was not yet recorded is harmless: the same (key, step, timestamp, value) is stored once.

One delivery worker per training process runs :func:`follow` in a child process, so sending
costs the training thread nothing (``python -m gradsweep.track.delivery``); the job delivers the rest
itself at the end. ``gradsweep sync`` delivers journals left by processes that ended.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from gradsweep.errors import ConfigError, GradsweepError, first_line
from gradsweep.locks import Busy, create_in_turn, locked_file
from gradsweep.track.hooks import is_gradsweep_module, resolve_hook
from gradsweep.track.create import create_run_once, drop_duplicates
from gradsweep.track.journal import HEADER, STATE, file_identity, read_json, records, write_json_atomic
from gradsweep.track.steps import FAMILIES, STEPS, TELEMETRY, StepSchema, chunk_name, read_records, sample, write_chunk
from gradsweep.track.uri import is_local_sqlite, sqlite_path

log = logging.getLogger("gradsweep.track.delivery")
MAX_METRICS = 1000  # MLflow's log_batch limit
MAX_PARAMS = 100
MAX_TAGS = 100
#: True in a job's delivery process: what the job finds out itself (a refused run, a full spool) it
#: reports, once, as its last word; the delivery process stays quiet about it
_owner_reports = False


class Unreachable(Exception):
    """The tracking store could not be reached; try again later."""


class HookNotReady(Exception):
    """A hook's inputs are not on the store yet (e.g. a sweep's children still being delivered):
    the journal stops before the hook and the next pass tries again."""


class Preloader:
    """Imports, in a background thread, the modules of the hooks that pending journals announce
    (their header's ``preload``: :func:`gradsweep.track.hooks.preload_modules`)."""

    def __init__(self) -> None:
        self.seen: set[Path] = set()
        self.started: set[str] = set()

    def __call__(self, folders: list[Path]) -> None:
        modules: list[str] = []
        for folder in folders:
            if folder in self.seen:
                continue
            self.seen.add(folder)
            for module in (read_json(folder / HEADER) or {}).get("preload") or ():
                if is_gradsweep_module(module) and module not in self.started and module not in modules:
                    modules.append(module)
        if modules:
            self.started.update(modules)
            threading.Thread(target=_import_quietly, args=(modules,), daemon=True).start()


def _import_quietly(modules: list[str]) -> None:
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # the hook itself reports what is wrong when it runs
            return


def run_hook(rec: dict[str, Any], folder: Path, header: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Run one hook record (:mod:`gradsweep.track.hooks`); transient store errors become Unreachable
    (try again later)."""
    fn = resolve_hook(rec.get("hook", ""))
    return _call(fn, folder=folder, header=header, run_id=run_id, **(rec.get("kwargs") or {})) or {}


#: HTTP statuses of a store that is there but cannot answer now: a gateway in front of a restarting
#: server (502, 504), MLflow's TEMPORARILY_UNAVAILABLE (503) and DEADLINE_EXCEEDED (504)
TRANSIENT_STATUS = frozenset({502, 503, 504})


def is_transient(e: BaseException) -> bool:
    """Connection failures and server-side unavailability, as opposed to a request the store rejects.

    Decided by exception type and error code along the exception's chain (MLflow wraps what
    requests, urllib3 and SQLAlchemy raised), never by the message: a run id, key or value that
    contains "503" is not an outage."""
    import sqlite3

    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        # RetryError: MLflow's session answers a 429/5xx it retried (MLFLOW_HTTP_REQUEST_MAX_RETRIES) with it
        if isinstance(cur, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        if isinstance(cur, sqlite3.OperationalError):  # the embedded store, busy with another writer
            return getattr(cur, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        if isinstance(cur, MlflowException) and _http_status(cur) in TRANSIENT_STATUS \
                and not isinstance(cur.__cause__, sqlalchemy.exc.DBAPIError):  # MLflow calls every database
            return True  # OperationalError TEMPORARILY_UNAVAILABLE (a missing table too): its cause decides
        cur = cur.__cause__ or cur.__context__ or getattr(cur, "orig", None)
    return False


def _http_status(e: Any) -> int:
    """The HTTP status an MlflowException stands for: its error code's, or the status a gateway put
    in a JSON body as the error code (RestException keeps the body as ``json``)."""
    code = str((getattr(e, "json", None) or {}).get("error_code", ""))
    return int(code) if code.isdigit() else int(e.get_http_status_code())


_clients: dict[str, Any] = {}
#: How every MLflow client of ours talks to a store. Fail fast: MLflow's default (7 retries,
#: exponential backoff) blocks a call for minutes when the server is down; we retry ourselves, with
#: the data safe in the journal meanwhile. And no "View run at <uri>" lines: the URI may carry a
#: password, and we print our own. MLflow reads these variables per request; a value the user or
#: the delivery process set first wins.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def mlflow_client(uri: str):
    """A new MlflowClient for ``uri``, configured as above (the one way this package makes one)."""
    from mlflow.tracking import MlflowClient

    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):  # its INFO lines ("Creating initial MLflow database
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # tables...") are not the user's business
    # urllib3 warns "Retrying (Retry(total=0...))" for every request to a store that is down (62 lines
    # in one sync); the outage reporter says it once
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    if not is_local_sqlite(uri):
        return MlflowClient(tracking_uri=uri)
    return create_in_turn(lambda: MlflowClient(tracking_uri=uri), sqlite_path(uri))


def client_for(uri: str):
    """One client per store for the delivery loop."""
    if uri not in _clients:
        _clients[uri] = _call(mlflow_client, uri)
    return _clients[uri]


@contextmanager
def locked(folder: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Exclusive delivery lock of one journal folder; Busy after ``wait_s``."""
    with locked_file(folder / "lock", wait_s):
        yield


_last_answer = 0.0  # monotonic time of this process's last call the store answered (even with an error)


def _call(fn, *args, **kwargs):
    global _last_answer
    try:
        result = fn(*args, **kwargs)
    except Exception as e:
        if is_transient(e):
            raise Unreachable(first_line(e, 300)) from None
        _last_answer = time.monotonic()
        raise
    _last_answer = time.monotonic()
    return result


def experiment_id(client, name: str, artifact_location: Optional[str] = None,
                  call: Callable[..., Any] = lambda fn, *a, **k: fn(*a, **k)) -> str:
    """The id of experiment ``name``, created if missing (by another worker at the same time, too)."""
    exp = call(client.get_experiment_by_name, name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment_name={name!r}: that experiment is deleted in the tracking store "
                          f"(id {exp.experiment_id}); allowed: restore it (mlflow experiments restore "
                          f"--experiment-id {exp.experiment_id}) or another name")
    if exp is not None:
        return exp.experiment_id
    try:
        return call(client.create_experiment, name, artifact_location=artifact_location)
    except Unreachable:
        raise
    except Exception:  # created concurrently by another worker
        exp = call(client.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


def _experiment_id(client, header: dict[str, Any]) -> str:
    return experiment_id(client, header["experiment_name"], header.get("artifact_location"), _call)


def _ensure_run(folder: Path, client, header: dict[str, Any], state: dict[str, Any]) -> Optional[str]:
    """Create the run on the store if the journal was opened while it was unreachable."""
    if state.get("run_id"):
        return state["run_id"]
    create = header.get("create")
    if create is None:  # the run exists but its state is not readable yet: next pass
        return None
    tags = dict(create.get("tags") or {})
    parent = create.get("parent_run_id")
    if not parent and create.get("parent_local_id"):
        parent_state = read_json(folder.parent / create["parent_local_id"] / STATE) or {}
        parent = parent_state.get("run_id")
        if not parent:
            return None  # the parent run is not on the store yet; it is delivered first
    if parent:
        tags["mlflow.parentRunId"] = parent
    tags["gradsweep.spooled"] = "true"
    experiment = _experiment_id(client, header)
    tried = bool(create.get("tried") or state.get("create_tried"))
    if not tried:  # recorded before the request: a pass after a lost answer looks for the run first
        state["create_tried"] = True
        write_json_atomic(folder / STATE, state)
    run_id = create_run_once(client, experiment, header.get("create_key") or folder.name, tried=tried, call=_call,
                             start_time=create.get("start_time"), tags=tags, run_name=create.get("run_name"))
    state.update(run_id=run_id, offset=0, done=False)
    write_json_atomic(folder / STATE, state)
    return run_id


def deliver(folder: Path, wait_s: float = 0.0) -> bool:
    """Deliver one journal as far as possible. True when the run is complete on the store.
    Raises Unreachable (store down) or Busy (another process holds the journal)."""
    try:
        with locked(folder, wait_s):
            return _deliver_locked(folder)
    except FileNotFoundError:
        return True  # a journal folder is removed only once delivered


def _deliver_locked(folder: Path) -> bool:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    header = read_json(folder / HEADER)
    state = read_json(folder / STATE) or {"offset": 0, "done": False}
    if state.get("done") or header is None:  # no header: removed by whoever delivered it
        return True
    client = client_for(header["uri"])
    try:
        run_id = _ensure_run(folder, client, header, state)
    except (MlflowException, GradsweepError) as e:  # the store refuses the run (its experiment deleted, a bad name)
        return _refused(folder, state, e)
    if run_id is None:
        return False
    metrics: list[Metric] = []
    pending_offset = state["offset"]

    def commit(offset: int) -> None:
        state["offset"] = offset
        write_json_atomic(folder / STATE, state)

    def send(fn, *args, what: str, **kwargs) -> bool:
        """One request. A rejection (not an outage) skips just these records: the rest still goes."""
        try:
            _call(fn, run_id, *args, **kwargs)
        except Unreachable:
            raise
        except Exception as e:
            _rejected(folder, state, what, e)
            return False
        return True

    def send_metrics() -> None:
        if metrics:
            send(client.log_batch, metrics=list(metrics), what=f"{len(metrics)} metric values")
            metrics.clear()
            commit(pending_offset)

    schema: list[StepSchema] = []

    def send_steps(final: bool) -> None:
        """The step records (steps.bin) beyond what was sent: dense-history chunks, sampled metrics.
        The schema is looked for at each call: the job may define its steps while a pass is reading."""
        if not schema and (loaded := StepSchema.load(folder)) is not None:
            schema.append(loaded)
        if schema:
            _deliver_steps(folder, schema[0], state, final, client, send, commit=lambda: commit(state["offset"]))

    send_steps(final=False)
    for offset, rec in records(folder, state["offset"]):
        op = rec["op"]
        if op == "metrics":
            values = rec["values"]
            if len(metrics) + len(values) > MAX_METRICS:
                send_metrics()
            metrics.extend(Metric(k, float(v), rec["ts"], rec["step"]) for k, v in values.items())
            pending_offset = offset
            continue
        send_metrics()
        if op == "params":
            items = [Param(k, v) for k, v in rec["params"].items()]
            for i in range(0, len(items), MAX_PARAMS):
                send(client.log_batch, params=items[i:i + MAX_PARAMS], what="params")
        elif op == "tags":
            items = [RunTag(k, v) for k, v in rec["tags"].items()]
            for i in range(0, len(items), MAX_TAGS):
                send(client.log_batch, tags=items[i:i + MAX_TAGS], what="tags")
        elif op == "artifact":
            if send(client.log_artifact, str(folder / rec["file"]), rec.get("artifact_path"),
                    what=f"artifact {rec.get('artifact_path') or '.'}/{Path(rec['file']).name}") and rec.get("source"):
                state.setdefault("moved", {})[rec["source"]] = rec["stat"]  # the store has it as it was then
        elif op == "hook":
            try:
                result = run_hook(rec, folder, header, run_id)
            except HookNotReady:
                return False  # the offset stays before the hook: the next pass runs it
            except Unreachable:
                raise
            except Exception as e:  # the run's records are on the store; the hook's work is extra
                result = {"error": first_line(e, 300)}
                log.error("%s of run %s failed: %s", rec.get("hook"), run_id, result["error"])
            state.setdefault("hooks", {})[rec.get("hook", "?")] = result
        elif op == "end":
            send_steps(final=True)  # the last chunk and the last, partial window
            # a create the server finished after its retry's answer (an embedded store answers in-process)
            if header.get("create_key") and not is_local_sqlite(header["uri"]):
                send(lambda rid: drop_duplicates(client, rid, _call), what="duplicate runs")
            if state.get("rejected"):  # the run says what it lacks
                send(client.set_tag, REJECTED_TAG, _rejection_summary(state), what="tags")
            if rec.get("status"):  # none: handed over to a process continuing the run in place
                send(client.set_terminated, rec["status"], rec.get("end_time"), what="the final status")
            drop_moved(state)
            # the owner with "done": a process that sees it done may end at once, and its delivery
            # process then removes what its own runs left (remove_delivered), found by this
            state.update(done=True, owner_pid=header.get("owner_pid"))
        pending_offset = offset
        commit(offset)
    send_metrics()
    if state.get("done"):
        finish(folder, state, keep_state="create" in header or "hooks" in state)
    return bool(state.get("done"))


def drop_moved(state: dict[str, Any]) -> None:
    """The files a run logged with ``move`` (its job folder's checkpoints and figures, unless
    ``tracking.keep_local_artifacts``), once the run's last record is on the store: each removed
    where it is still the very file the store received (one rewritten since, e.g. a ``last.pt``
    saved after its last upload, stays), and its folder with it once empty. A run the store never
    got, or an upload it refused, keeps its file."""
    for source, identity in (state.pop("moved", None) or {}).items():
        path = Path(source)
        try:
            if file_identity(path) != identity:
                continue
            path.unlink()
            path.parent.rmdir()  # checkpoints/, figures/ once empty
        except OSError:
            continue


def _deliver_steps(folder: Path, schema: StepSchema, state: dict[str, Any], final: bool, client,
                   send: Callable[..., bool], commit: Callable[[], None]) -> None:
    """Send what ``steps.bin`` holds beyond the state's offsets: each complete Parquet chunk as a
    ``telemetry/`` artifact (the last, partial one when ``final``), then the sampled points of the
    complete windows as metrics (see :mod:`gradsweep.track.steps`)."""
    from mlflow.entities import Metric

    offsets = state.setdefault("steps", {"chunked": 0})
    try:
        size = (folder / STEPS).stat().st_size
    except FileNotFoundError:
        return
    chunk_bytes = schema.rows_per_chunk * schema.width
    while final or size - offsets["chunked"] >= chunk_bytes:  # an open chunk is not read at every pass
        recs = read_records(folder, schema, offsets["chunked"], max_rows=schema.rows_per_chunk)
        if len(recs) == 0 or (len(recs) < schema.rows_per_chunk and not final):
            break
        # written outside the spool: a spool on a full disk still gets its records delivered
        with tempfile.TemporaryDirectory(prefix="gradsweep-chunk-") as tmp:
            path = write_chunk(recs, schema, Path(tmp) / chunk_name(schema, int(recs["step"][0])))
            send(client.log_artifact, str(path), TELEMETRY, what="dense history (telemetry/)")
        offsets["chunked"] += len(recs) * schema.width
        commit()
    for family in FAMILIES:  # each its own windows and offset: headline points do not wait for the wider ones
        key = f"sent_{family}"
        recs = read_records(folder, schema, offsets.get(key, 0))
        points, used = sample(recs, schema, final, family)
        for i in range(0, len(points), MAX_METRICS):
            batch = [Metric(name, value, ts, step) for name, step, ts, value in points[i:i + MAX_METRICS]]
            send(client.log_batch, metrics=batch, what=f"{len(batch)} metric values")
        if used:
            offsets[key] = offsets.get(key, 0) + used * schema.width
            commit()


REJECTED_TAG = "gradsweep.rejected"


def _rejected(folder: Path, state: dict[str, Any], what: str, e: Exception) -> None:
    """The store refused some records (a file it cannot write, a deleted run): they are skipped, the
    run's tag ``gradsweep.rejected`` lists them, and the console says so once per kind."""
    reason = first_line(e, 300)
    rejected = state.setdefault("rejected", {})
    if what not in rejected:
        print(f"[gradsweep] run {state.get('run_id')}: the tracking store refused {what}: {reason}",
              file=sys.stderr, flush=True)
    rejected[what] = reason


def _rejection_summary(state: dict[str, Any]) -> str:
    return "; ".join(f"{what}: {reason}" for what, reason in state["rejected"].items())[:5000]


def _refused(folder: Path, state: dict[str, Any], e: Exception) -> bool:
    """The store refuses to create the run at all: the journal is closed as refused and kept, with
    the reason, so `gradsweep sync` explains it instead of retrying it forever."""
    reason = first_line(e, 300)
    state.update(done=True, refused=reason, refused_input=isinstance(e, GradsweepError))
    write_json_atomic(folder / STATE, state)
    if not _owner_reports:  # else the job writing the journal says it, as its last word
        print(f"[gradsweep] the tracking store refused to create the run of journal {folder}: {reason}; "
              "its records stay there", file=sys.stderr, flush=True)
    return True



def finish(folder: Path, state: dict[str, Any], keep_state: bool) -> None:
    """Drop a delivered journal. A run created from the spool keeps its state and header until its owner
    has ended (:func:`remove_delivered`): children spooled with it find its run id there, and the
    process that ran it, its hooks' results."""
    if not keep_state:
        shutil.rmtree(folder, ignore_errors=True)
        return
    write_json_atomic(folder / STATE, state)
    for entry in folder.iterdir():
        if entry.name not in (STATE, HEADER):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def removable(spool: Path, owner_pid: Optional[int] = None) -> list[Path]:
    """Folders of delivered runs in ``spool`` (their state.json, kept while their owner may still
    read it) whose owner process has ended (``owner_pid``: it has, say its delivery process's pipe;
    any other: where this host can tell) and that no journal still pending names as its parent.
    A run the store refused stays, with why (``gradsweep sync`` says it)."""
    from gradsweep.locks import pid_alive
    from gradsweep.track.journal import writer_alive

    if not spool.is_dir():
        return []
    parents: set[Optional[str]] = set()
    for folder in pending(spool):
        head = read_json(folder / HEADER) or {}
        parents.add(head.get("parent_local_id") or (head.get("create") or {}).get("parent_local_id"))
    out = []
    for folder in sorted(spool.iterdir()):
        state = read_json(folder / STATE) if folder.is_dir() else None
        if not state or not state.get("done") or state.get("refused") or folder.name in parents:
            continue
        header = read_json(folder / HEADER)
        owner = state.get("owner_pid") or (header or {}).get("owner_pid")
        if owner_pid is None or owner != owner_pid:
            if writer_alive(folder, header) if header else (owner is None or pid_alive(owner)):
                continue
        out.append(folder)
    return out


CLAIMS = ".runs"  #: claims of runs continued in place (gradsweep.track.ownership.claim_run), one lock file each


def remove_delivered(spool: Path, owner_pid: Optional[int] = None) -> int:
    """Remove :func:`removable` folders, and the claims (:data:`CLAIMS`) no live process holds.
    Returns how many folders."""
    from gradsweep.locks import drop_unheld

    folders = removable(spool, owner_pid)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        _seen_done.discard(folder)
    drop_unheld(spool / CLAIMS)
    return len(folders)


def refusal(folder: Path) -> Optional[str]:
    """Why the store refused to create this journal's run, if it did."""
    return (read_json(folder / STATE) or {}).get("refused")


def refused(spool: Path) -> list[tuple[Path, str]]:
    """Journals whose run the store refused to create, with the reason (kept for the user)."""
    if not spool.is_dir():
        return []
    return [(f, r) for f in sorted(spool.iterdir()) if f.is_dir() and (r := refusal(f))]


#: folders seen delivered (a delivered journal never becomes pending again): a long-lived spool keeps
#: the state of every run created from it, and a delivery process looks at the spool 4 times a second
_seen_done: set[Path] = set()


def pending(spool: Path, owner_pid: Optional[int] = None) -> list[Path]:
    """Journals not yet fully delivered (of one owner process, or of any)."""
    if not spool.is_dir():
        return []
    out = []
    def age(p: Path) -> float:  # a journal may be removed by its deliverer meanwhile
        try:
            return (p / HEADER).stat().st_mtime
        except OSError:
            return float("inf")

    for folder in sorted((p for p in spool.iterdir() if p not in _seen_done and p.is_dir()), key=age):
        header = read_json(folder / HEADER)
        state = read_json(folder / STATE) or {}
        if state.get("done"):
            _seen_done.add(folder)
        if header is None or state.get("done"):
            continue
        if owner_pid is None or header.get("owner_pid") == owner_pid:
            out.append(folder)
    return out


class OutageReporter:
    """Says once that it is spooling and once that it caught up, however many processes (the
    delivery worker, the job finishing its run, ``gradsweep sync``) notice the same outage: the
    first to see it creates ``<spool>/.outage`` and speaks, the one that removes it speaks again."""

    def __init__(self, out=sys.stderr):
        self.out = out
        self.down_since: Optional[float] = None
        self.marker: Optional[Path] = None

    def unreachable(self, spool: Path, reason: str) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        self.marker = spool / ".outage"
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process has said it
        except OSError:
            pass
        print(f"[gradsweep] tracking store unreachable ({reason}); training goes on, spooling to {spool}",
              file=self.out, flush=True)

    def reachable(self, spool: Optional[Path] = None) -> None:
        """The store answered. Whoever removes the marker says so, also when the process that
        announced the outage ended before it (else a stale marker would silence the next outage)."""
        if self.down_since is None and spool is None:
            return
        marker = self.marker or (spool / ".outage" if spool is not None else None)
        if marker is None:  # not down, and no spool to look in
            return
        down = f" after {time.monotonic() - self.down_since:.0f} s" if self.down_since is not None else ""
        self.down_since = None
        try:
            marker.unlink()
        except OSError:
            return  # another process has said it, or nobody announced an outage
        print(f"[gradsweep] tracking store reachable again{down}; spooled records delivered",
              file=self.out, flush=True)


def deliver_all(folders: list[Path], reporter: OutageReporter, spool: Path, busy_wait_s: float = 0.0) -> int:
    """One pass over journals; returns how many are still not complete. A journal another process
    is delivering is waited for up to ``busy_wait_s``. In a job's delivery process a spool that
    cannot be written (disk full, read-only) is not reported: the job finds the same at its next
    append and says it, once, as its last word."""
    started, left = time.monotonic(), 0
    for folder in folders:
        try:
            done = deliver(folder, wait_s=busy_wait_s)
        except Unreachable as e:
            reporter.unreachable(spool, str(e))
            return len(folders)
        except Busy:
            done = False
        except OSError as e:
            if not _owner_reports:
                log.error("delivery of %s failed: %s", folder.name, e)
            done = False
        except Exception as e:  # a journal the store rejects must not block the others
            log.error("delivery of %s failed: %s", folder.name, e)
            done = False
        if not done:
            left += 1
    # only an answer from the store ends an outage: a pass that found every journal locked by
    # another process (Busy) or had nothing new to send has not talked to it
    if _last_answer >= started:
        reporter.reachable(spool)
    return left


#: set when the owner writes to its pipe (it opened or ended a run: look at the spool now, not at
#: the next poll) and when the pipe closes
_wake = threading.Event()


def watch_owner(control, spool: Path, owner_pid: Optional[int] = None) -> threading.Event:
    """An event set once the owner's pipe ``control`` closes (the owner ended or died). With
    ``owner_pid``: this process exits at once then if the owner left nothing to deliver (a command
    that failed its checks, or a job whose runs were all delivered), even in the middle of
    importing MLflow: CPU a short command would otherwise spend for nothing."""
    closed = threading.Event()
    threading.Thread(target=_detach_when_closed, args=(control, closed, spool, owner_pid), daemon=True).start()
    return closed


IDLE_WAIT_S = 2.0  # between looks at the spool while the owner has nothing to deliver


def follow(spool: Path, owner_pid: int, interval_s: float = 0.25, control=None,
           closed: Optional[threading.Event] = None) -> None:
    """Deliver the owner's journals until ``control`` (the owner's pipe) closes, then once more.
    Every ``interval_s`` while the owner has journals to deliver; while it has none, when it says
    it opened or ended a run (``DeliveryWorker.nudge``), else every ``IDLE_WAIT_S``."""
    global _owner_reports
    _owner_reports = True
    reporter = OutageReporter()
    preload = Preloader()
    if closed is None and control is not None:
        closed = watch_owner(control, spool)
    while True:
        folders = pending(spool, owner_pid)
        preload(folders)
        deliver_all(folders, reporter, spool)
        if closed is None:
            time.sleep(interval_s)
            continue
        _wake.wait(interval_s if folders else IDLE_WAIT_S)
        _wake.clear()
        if closed.is_set():
            break  # owner closed the pipe or died
    deliver_all(pending(spool, owner_pid), reporter, spool)
    remove_delivered(spool, owner_pid)


def _detach_when_closed(control, closed: threading.Event, spool: Path, owner_pid: Optional[int] = None) -> None:
    """Once the owner is gone, stop holding its stdout/stderr: whoever reads the owner's output
    (a terminal pipeline, ``subprocess.run``) sees it end when the owner ends, not later,
    when this process has finished importing MLflow and its last pass. What the last pass says
    (only a killed owner leaves anything to deliver) goes to ``<spool>/delivery.log``."""
    while control.read(1):
        _wake.set()  # the owner opened or ended a run (DeliveryWorker.nudge); this returns at EOF
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(spool / "delivery.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:  # the spool is gone or not writable: be silent rather than hold the pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    if owner_pid is not None and not pending(spool, owner_pid):
        remove_delivered(spool, owner_pid)
        # os._exit (public, documented): this watcher thread ends the whole delivery process at once,
        # which sys.exit cannot from a thread; nothing is left to deliver and no handler needs to run
        os._exit(0)
    closed.set()
    _wake.set()


#: the MLflow store module per kind of store (gradsweep.track.uri.store_kind): imported, never
#: opened, before the first journal arrives (opening a store may create it; the job's checks come first)
STORE_MODULES = {"sql": "mlflow.store.tracking.sqlalchemy_store", "rest": "mlflow.store.tracking.rest_store"}
NICE = 10  # delivery is background work: where cores are scarce, the training step goes first


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="deliver gradsweep run journals (started by the trainer)")
    ap.add_argument("spool", type=Path)
    ap.add_argument("--owner-pid", type=int, required=True)
    ap.add_argument("--store", choices=sorted(STORE_MODULES), help="load the module of this kind of store now")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logging.basicConfig(level=logging.WARNING, format="[gradsweep.track.delivery] %(message)s")
    os.nice(NICE)
    # from the start: the owner may end during the import
    closed = watch_owner(sys.stdin.buffer, args.spool, args.owner_pid)
    # Import MLflow before the first pass: a pass holds the journal's lock, and a lock held through
    # a niced import of seconds made a short job's own final delivery wait for it (Busy) at its close.
    import importlib

    import mlflow.entities  # loaded for its import time, not a name
    import mlflow.tracking  # noqa: F401

    if args.store:  # what MLflow would load at the first client (SQLAlchemy's store, seconds), loaded
        try:  # while the job loads PyTorch, not after
            importlib.import_module(STORE_MODULES[args.store])
        except ImportError:  # the first client says what is missing
            pass

    try:
        follow(args.spool, args.owner_pid, closed=closed)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    # Run as ``python -m``, this file is ``__main__``, while the hooks import ``gradsweep.track.delivery``:
    # two copies of the module, and a hook's Unreachable (the other copy's class) was not caught here as
    # one, so a hook that met a lost answer failed for good instead of being tried again. One copy:
    from gradsweep.track.delivery import main as _main

    _main()
