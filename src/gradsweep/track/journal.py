"""The run journal: everything a run logs is appended to local disk first, then delivered.

A run's params, tags, sparse metrics (evaluations, end-of-run figures), artifacts and final status
are written as JSON lines to ``<spool>/<local id>/journal.jsonl`` (artifacts are linked beside
it); its per-step values as fixed-size binary records in ``steps.bin`` (:mod:`gradsweep.track.steps`). A delivery worker
(:mod:`gradsweep.track.delivery`) sends them to the tracking store with ``log_batch`` and records how
far it got in ``state.json``. So the training thread never waits on the network, a tracking
server outage only delays delivery, and whatever was not delivered when the process ended is
still on disk for ``gradsweep sync``.

MLflow's client has no offline mode; this is the smallest layer that gives it one, on top of
``MlflowClient`` rather than instead of it.
"""
from __future__ import annotations

import json
import os
import struct
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

import numpy as np

from gradsweep.errors import ConfigError, RecordingLost
from gradsweep.locks import hold, is_held, process_id, process_state, release, temporary_name
from gradsweep.names import FAILURE_TAG
from gradsweep.track.hooks import hook_target
from gradsweep.track.steps import HEAD, STEPS, StepSchema, record_dtype
from gradsweep.track.uri import is_local_sqlite, sqlite_path

_HEAD = struct.Struct("<qq")  # a step record's step and wall time (gradsweep.track.steps.record_dtype)
assert _HEAD.size == HEAD
FLUSH_EVERY_S = 0.25  # metric records are flushed to the file at least this often
JOURNAL = "journal.jsonl"
STATE = "state.json"
HEADER = "header.json"
WRITER = "writer.lock"  #: flock held by the journal's writer from its creation to its end


def default_spool_dir(uri: str) -> Path:
    """Beside the embedded store (``mlruns/spool``), or ``mlruns/spool`` in the working dir for a server."""
    if is_local_sqlite(uri):
        return sqlite_path(uri).parent / "spool"
    return Path.cwd() / "mlruns" / "spool"


def worker_id() -> str:
    """Who writes a run (tag ``gradsweep.worker``): host, PID, boot id and the process's start time,
    so a PID that was reused, or that a PID namespace numbered, is not taken for the writer."""
    return process_id()


def worker_alive(worker: str) -> bool:
    """False only when this host can tell that the worker's process is gone."""
    return process_state(worker) is not False


def writer_alive(folder: Path, header: Optional[dict[str, Any]] = None) -> bool:
    """Whether the process writing journal ``folder`` is alive: the lock it holds for its whole life
    (:data:`WRITER`) answers where it can be seen; else its recorded identity (:func:`worker_alive`)."""
    held = is_held(folder / WRITER)
    if held is not None:
        return held
    header = header if header is not None else read_json(folder / HEADER) or {}
    return worker_alive(header.get("worker") or f"{socket.gethostname()}:{header.get('owner_pid')}")


def file_identity(path: Path) -> list[int]:
    """What tells a file from the one that replaces it at the same path (device, inode, size, mtime):
    a checkpoint is rewritten by renaming a new file into place."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def now_ms() -> int:
    return int(time.time() * 1000)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = temporary_name(path)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def journal_run_ids(folder: Path) -> set[str]:
    """The run ids a journal folder names: its header's (a run it continues) and its state's (the
    run its delivery created)."""
    header, state = read_json(folder / HEADER) or {}, read_json(folder / STATE) or {}
    return {rid for rid in (header.get("run_id"), state.get("run_id")) if rid}


def records(folder: Path, offset: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(offset after the record, record) for every complete line of a journal from ``offset``."""
    with open(folder / JOURNAL, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return  # being written
            offset += len(line)
            yield offset, json.loads(line)


def has_artifact(folder: Path, artifact_path: str) -> bool:
    """Whether a journal has recorded an artifact under ``artifact_path`` (for watching a live run)."""
    try:
        return any(r["op"] == "artifact" and r.get("artifact_path") == artifact_path for _, r in records(folder))
    except FileNotFoundError:  # delivered and removed meanwhile
        return False


def refused_error(state: dict[str, Any]) -> Exception:
    """The error for a run the store refused to create: the user's input (a deleted experiment)
    or not."""
    reason = state.get("refused", "refused")
    return ConfigError(reason) if state.get("refused_input") else \
        RecordingLost(f"the tracking store refused the run: {reason}")


def close_orphan(folder: Path, handover: bool = False) -> bool:
    """A journal whose writer died without ending it (SIGKILL, a crash) gets the ending the writer
    would have written: tag ``failure=worker_died`` and status KILLED. ``handover``: the run is about
    to be continued in place by a new process: the journal ends without a status, so delivering it
    sends everything it holds and leaves the run to its new writer. A torn last line (the crash
    came in the middle of a write) is dropped first. True if it was closed."""
    from gradsweep.locks import Busy, locked_file

    header = read_json(folder / HEADER)
    if header is None or writer_alive(folder, header):
        return False
    try:
        with locked_file(folder / "lock", wait_s=5.0):  # not while a deliverer reads it
            if any(rec["op"] == "end" for _, rec in records(folder)):
                return False
            with open(folder / JOURNAL, "r+b") as f:
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)  # a torn tail: never append onto it
                f.seek(0, os.SEEK_END)
                ending = [{"op": "end", "status": None, "end_time": now_ms()}] if handover else \
                    [{"op": "tags", "tags": {FAILURE_TAG: "worker_died"}},
                     {"op": "end", "status": "KILLED", "end_time": now_ms()}]
                f.write("".join(json.dumps(r) + "\n" for r in ending).encode())
    except (OSError, ValueError, Busy):
        return False
    return True


class RunJournal:
    """Append-only log of one run. Also a :class:`~gradsweep.train.sinks.Sink` for the training loop.

    A journal that cannot be written (disk full, read-only) or that was deleted under the run is
    *lost*: the append that finds out raises :class:`RecordingLost` (the job stops and closes the
    run FAILED through the store directly, see :func:`gradsweep.track.closing.close_run`); later
    appends are counted in ``dropped`` and do nothing."""

    def __init__(self, folder: Path, run_id: Optional[str] = None, header: Optional[dict[str, Any]] = None):
        self.folder = folder
        self.local_id = folder.name
        self.header = header or read_json(folder / HEADER) or {}
        self._run_id = run_id
        self._file = open(folder / JOURNAL, "a", encoding="utf-8")
        self._steps: Optional[IO[bytes]] = None  # steps.bin, opened by define_steps
        self.schema: Optional[StepSchema] = None
        self._last_flush = time.monotonic()
        self._artifacts = 0
        self.lost: Optional[str] = None  # why, once the journal is lost
        self._refusal_seen = False
        self.dropped = 0  # records not written since
        self.last_step = -1  # the last step whose metrics were written
        self._writer: Optional[int] = None  # the WRITER lock's descriptor, held until close

    @classmethod
    def create(cls, spool: Path, header: dict[str, Any]) -> "RunJournal":
        """``header``: uri, experiment_name, artifact_location, and either ``run_id`` (the run exists)
        or ``create`` (run_name, tags, parent_run_id | parent_local_id, start_time)."""
        folder = Path(spool) / uuid.uuid4().hex
        header = {**header, "owner_pid": os.getpid(), "worker": worker_id()}
        writer = None
        try:
            folder.mkdir(parents=True)
            writer = hold(folder / WRITER)  # before the header: a listed journal's writer is known
            if header.get("run_id"):  # before the header: a journal is listed (pending) once it has one
                write_json_atomic(folder / STATE, {"run_id": header["run_id"], "offset": 0, "done": False})
            write_json_atomic(folder / HEADER, header)
            journal = cls(folder, header.get("run_id"), header)
        except OSError as e:
            release(writer)
            raise RecordingLost(f"cannot write a run journal in {spool}: {e.strerror or e}") from None
        journal._writer = writer
        return journal

    @property
    def run_id(self) -> Optional[str]:
        """The tracking store's run id, once the run exists there."""
        if self._run_id is None:
            state = read_json(self.folder / STATE)
            self._run_id = state.get("run_id") if state else None
        return self._run_id

    def _append(self, record: dict[str, Any], flush: bool = True) -> None:
        if self.lost is not None:
            self.dropped += 1
            return
        try:
            if flush and self._steps is not None:  # the steps before this record are on disk before it
                self._steps.flush()
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            if flush or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
                self._flush()
        except OSError as e:
            self._lose(e)

    def flush(self) -> None:
        """Everything written so far to the files (the delivery process then sees it)."""
        try:
            self._flush()
        except OSError as e:
            self._lose(e)

    def _flush(self) -> None:
        if self._steps is not None:
            self._steps.flush()
        self._file.flush()
        self._last_flush = time.monotonic()
        if os.fstat(self._file.fileno()).st_nlink == 0:  # unlinked: nobody will ever read it
            raise FileNotFoundError(0, "was deleted while the run was going")
        if self._run_id is None:
            self._poll_state()

    def _poll_state(self) -> None:
        """Until the delivery process has created the run: learn its id, or that the store refused
        it (raised once, so the job stops early instead of training for nothing)."""
        state = read_json(self.folder / STATE)
        if not state:
            return
        self._run_id = state.get("run_id")
        if state.get("refused") and not self._refusal_seen:
            self._refusal_seen = True
            raise refused_error(state)

    def _lose(self, e: OSError) -> None:
        self.lost = f"{self.folder} {e.strerror or e}" if isinstance(e, FileNotFoundError) else \
            f"{self.folder} could not be written: {e.strerror or e}"
        self.dropped += 1
        for f in (self._file, self._steps):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        raise RecordingLost(f"run journal {self.lost}") from None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"op": "metrics", "step": step, "ts": now_ms(), "values": metrics}, flush=False)
        self.last_step = max(self.last_step, step)

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        """Fix the names of the run's step values (once, before the first :meth:`log_steps`)."""
        if self.lost is not None:
            return
        self.schema = StepSchema(list(names), total_steps, start_ms=now_ms(),
                                 **{k: self.header[k] for k in ("max_points", "max_param_points", "param_groups")
                                    if k in self.header})
        try:
            self.schema.save(self.folder)
            self._steps = open(self.folder / STEPS, "ab")
        except OSError as e:
            self._lose(e)

    def log_steps(self, steps, values) -> None:
        """One binary record per row of ``values`` (float32, one column per name of :meth:`define_steps`)."""
        if self.lost is not None:
            self.dropped += 1
            return
        out, schema = self._steps, self.schema
        assert out is not None and schema is not None, "log_steps before define_steps"
        try:
            if len(steps) == 1:  # the common case: one step, two writes into the file's buffer
                out.write(_HEAD.pack(int(steps[0]), now_ms()))
                out.write(values.tobytes())
            else:
                rec = np.empty(len(steps), record_dtype(len(schema.names)))
                rec["step"], rec["ts"], rec["v"] = steps, now_ms(), values
                out.write(rec.tobytes())
            if time.monotonic() - self._last_flush > FLUSH_EVERY_S:
                self._flush()
        except OSError as e:
            self._lose(e)
        self.last_step = max(self.last_step, int(steps[-1]))

    def log_params(self, params: dict[str, Any]) -> None:
        self._append({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append({"op": "tags", "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None, move: bool = False) -> None:
        """Keep the file as it is now (it may change later, e.g. ``last.pt``), upload it on delivery.
        ``move``: the file itself is removed once the store has it, if it is still the file logged
        here (:func:`gradsweep.track.delivery.drop_moved`).

        "As it is now" is a hard link where the journal is on the same file system, not a copy. That
        holds the logged content only because no logged file is written in place afterwards: a
        checkpoint is replaced by a new file renamed over it (``CheckpointStore.save``: ``torch.save``
        to a temporary name, then ``os.replace``), which leaves the linked inode untouched; the
        job's config and figure are written before they are logged. A writer that rewrites a logged
        file in place changes the journal's copy too (a job resumed in the same folder writes its
        ``config.yaml`` again, in place, while the killed run's journal may still be spooled)."""
        if self.lost is not None:
            self.dropped += 1
            return
        path = Path(path)
        self._artifacts += 1
        rel = f"artifacts/{self._artifacts:05d}/{path.name}"
        record: dict[str, Any] = {"op": "artifact", "file": rel, "artifact_path": artifact_path}
        try:
            (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
            if move:
                record.update(source=str(path.resolve()), stat=file_identity(path))
            try:
                os.link(path, self.folder / rel)  # no copy on the same file system: see the docstring
            except OSError:
                shutil.copy2(path, self.folder / rel)
        except OSError as e:
            self._lose(e)
        self._append(record)

    def after_delivery(self, hook: Callable[..., Any], **kwargs: Any) -> None:
        """Run ``hook`` (a function marked :func:`gradsweep.track.hooks.delivery_hook`; recorded as its
        ``<module>:<name>``) with ``kwargs`` where this record is delivered: in the delivery process,
        the job's own close, or ``gradsweep sync``, whichever has the store at hand (and MLflow loaded)."""
        self._append({"op": "hook", "hook": hook_target(hook), "kwargs": kwargs})

    def end(self, status: str) -> None:
        try:
            self._append({"op": "end", "status": status, "end_time": now_ms()})
        finally:
            self.close()

    def close(self) -> None:
        if self._file.closed:
            release(self._writer)
            self._writer = None
            return
        try:
            if self._steps is not None and not self._steps.closed:
                self._steps.flush()
                os.fsync(self._steps.fileno())
                self._steps.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            self._lose(e)
        finally:
            release(self._writer)
            self._writer = None
