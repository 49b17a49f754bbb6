"""Running a Hydra entry point with one-line errors.

Hydra prints composition errors over several lines (and a traceback for anything else). For
input errors we want one line naming the key and the allowed values and a non-zero exit, so we
let Hydra raise (HYDRA_FULL_ERROR=1) and format the exception here. Set HYDRA_FULL_ERROR=1
yourself to get Hydra's full traceback instead.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import sys
from typing import Callable, NoReturn

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from gradsweep.errors import GradsweepError, NonFiniteError, RecordingLost
from gradsweep.run.job import main_thread, raise_terminated
from gradsweep.sweep.hydra_adapter import preflight

EXIT_INPUT = 2
EXIT_FAILED = 1


def one_line(e: BaseException) -> str:
    """A single line for a Hydra / OmegaConf / gradsweep error."""
    if isinstance(e, GradsweepError):
        return str(e).splitlines()[0]
    text = str(e)
    m = re.search(r"Could not find '([^']+)'", text)
    if m and "/" in m.group(1):
        group, choice = m.group(1).rsplit("/", 1)
        found = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        options = [o.strip() for o in (found.group(1) if found else "").splitlines()
                   if o.strip() and not o.strip().endswith("_schema")]
        return f"{group}={choice}: unknown option; allowed: {'|'.join(options) or '(none)'}"
    if isinstance(e, OmegaConfBaseException) or isinstance(e.__cause__, OmegaConfBaseException):
        inner = e if isinstance(e, OmegaConfBaseException) else e.__cause__
        key = getattr(inner, "full_key", None)
        first = str(inner).splitlines()[0]
        return f"{key}: {first}" if key else first
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines)[:500] if lines else type(e).__name__


class _WithoutJobErrorPreamble:
    """stderr without the "Error executing job with overrides: [...]" line Hydra writes before it
    re-raises a job's exception (straight to sys.stderr, not through logging): we report the
    exception itself, in one line for input errors, and the overrides are the user's own command."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run_cli(main: Callable[[], object], config_dir: str, config_name: str) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's own reporting
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise; we report (and undo this on the way out)
    try:
        _run_reporting_errors(main, config_dir, config_name)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


def _run_reporting_errors(main: Callable[[], object], config_dir: str, config_name: str) -> None:
    try:
        preflight(config_dir, config_name, sys.argv[1:])
    except Exception as e:  # preflight only parses and composes the command line: any error is the input's
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    # SIGTERM stops the whole command like Ctrl-C, wherever it arrives (also between the jobs of a
    # sweep, or while a job is still opening its run): runs end KILLED, Optuna trials FAIL
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread() else None
    stderr, sys.stderr = sys.stderr, _WithoutJobErrorPreamble(sys.stderr)
    try:
        main()
    except NonFiniteError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except RecordingLost as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except (GradsweepError, HydraException, MissingConfigException, OmegaConfBaseException) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        sys.stderr = stderr
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_as_process(main: Callable[[], object], config_dir: str, config_name: str) -> NoReturn:
    """``python src/train.py``: :func:`run_cli`, then exit without tearing down every module.

    The exit handlers libraries registered run, files and streams are flushed; what is skipped is
    the interpreter's module-by-module finalization, which took 1.3-1.6 s after a job with torch
    and MLflow loaded (measured: every job and every test that starts one waited for it)."""
    try:
        run_cli(main, config_dir, config_name)
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): Python would print it and exit 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
