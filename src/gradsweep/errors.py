"""Errors the CLI reports as one line (no traceback)."""
from __future__ import annotations

from typing import Optional


def first_line(e: BaseException, limit: Optional[int] = None, default: Optional[str] = None) -> str:
    """The first line of an error's message, cut to ``limit`` characters: what a one-line report
    shows of it. An empty message gives ``default`` (the exception's type name unless given)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else (type(e).__name__ if default is None else default)
    return line[:limit] if limit is not None else line


class GradsweepError(Exception):
    """Base of every error that is the user's input, not a bug."""


class ConfigError(GradsweepError):
    """Invalid configuration: the message names the key and the allowed values."""


class DataError(GradsweepError):
    """Unreadable or malformed data files: the message names the file and line."""


class CheckpointError(GradsweepError):
    """Missing, corrupt or incompatible checkpoint."""


class RecordingLost(Exception):
    """What a run logs can no longer be recorded (its journal was deleted, or the disk under it is
    full or read-only). Not the user's input: the command exits 1 after the run is closed FAILED
    wherever the tracking store can be told."""


class NonFiniteError(GradsweepError):
    """Training produced a NaN/Inf loss or gradient."""

    def __init__(self, what: str, step: int):
        super().__init__(f"non-finite {what} at step {step}")
        self.what = what
        self.step = step

    @property
    def tag(self) -> str:
        return f"nonfinite_{self.what}"


class RankLost(Exception):
    """A rank of a ``trainer.devices=N`` job died while training (killed, out of memory): the job's
    run is FAILED with the rank and how it ended, in one line; the command exits 1."""


class StopRun(Exception):
    """Not an error: raised by a training loop's ``on_eval`` hook to stop a run on purpose (an Optuna
    pruner). The job closes the run FINISHED (not FAILED or KILLED) with tags ``gradsweep.stopped=<reason>``
    and ``gradsweep.stopped_step`` and `` (<reason>)`` after its name, and returns the exception in its outcome."""

    reason = "stopped"
    step = -1


class JobLost(Exception):
    """A job of a sweep ended without returning (cancelled, killed, out of time or memory, its node
    failed), as a cluster launcher reports it: the sweep's other jobs ran; the command exits 1."""
