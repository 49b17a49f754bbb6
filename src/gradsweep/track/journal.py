"""The run journal: everything a run logs is appended to local disk first, then delivered.

A run's params, tags, metrics, artifacts and final status are written as JSON lines to
``<spool>/<local id>/journal.jsonl`` (artifacts are copied beside it). A delivery worker
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
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from gradsweep.track.uri import is_local_sqlite, sqlite_path

FLUSH_EVERY_S = 0.25  # metric records are flushed to the file at least this often
JOURNAL = "journal.jsonl"
STATE = "state.json"
HEADER = "header.json"


def default_spool_dir(uri: str) -> Path:
    """Beside the embedded store (``mlruns/spool``), or ``mlruns/spool`` in the working dir for a server."""
    if is_local_sqlite(uri):
        return sqlite_path(uri).parent / "spool"
    return Path.cwd() / "mlruns" / "spool"


def now_ms() -> int:
    return int(time.time() * 1000)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


class RunJournal:
    """Append-only log of one run. Also a :class:`~gradsweep.train.sinks.Sink` for the training loop."""

    def __init__(self, folder: Path, run_id: Optional[str] = None):
        self.folder = folder
        self.local_id = folder.name
        self._run_id = run_id
        self._file = open(folder / JOURNAL, "a", encoding="utf-8")
        self._last_flush = time.monotonic()
        self._artifacts = 0

    @classmethod
    def create(cls, spool: Path, header: dict[str, Any]) -> "RunJournal":
        """``header``: uri, experiment_name, artifact_location, and either ``run_id`` (the run exists)
        or ``create`` (run_name, tags, parent_run_id | parent_local_id, start_time)."""
        folder = Path(spool) / uuid.uuid4().hex
        folder.mkdir(parents=True)
        write_json_atomic(folder / HEADER, {**header, "owner_pid": os.getpid()})
        if header.get("run_id"):
            write_json_atomic(folder / STATE, {"run_id": header["run_id"], "offset": 0, "done": False})
        return cls(folder, header.get("run_id"))

    @property
    def run_id(self) -> Optional[str]:
        """The tracking store's run id, once the run exists there."""
        if self._run_id is None:
            state = read_json(self.folder / STATE)
            self._run_id = state.get("run_id") if state else None
        return self._run_id

    def _append(self, record: dict[str, Any], flush: bool = True) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if flush or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self._file.flush()
            self._last_flush = time.monotonic()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._append({"op": "metrics", "step": step, "ts": now_ms(), "values": metrics}, flush=False)

    def log_params(self, params: dict[str, Any]) -> None:
        self._append({"op": "params", "params": {k: str(v)[:6000] for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append({"op": "tags", "tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """Copy the file now (it may change later, e.g. ``last.pt``), upload it on delivery."""
        path = Path(path)
        self._artifacts += 1
        rel = f"artifacts/{self._artifacts:05d}/{path.name}"
        (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, self.folder / rel)  # no copy when on the same file system
        except OSError:
            shutil.copy2(path, self.folder / rel)
        self._append({"op": "artifact", "file": rel, "artifact_path": artifact_path})

    def end(self, status: str) -> None:
        self._append({"op": "end", "status": status, "end_time": now_ms()})
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

