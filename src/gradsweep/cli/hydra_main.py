"""Running a Hydra entry point with one-line errors.

Hydra prints composition errors over several lines (and a traceback for anything else). For
input errors we want one line naming the key and the allowed values and a non-zero exit, so we
let Hydra raise (HYDRA_FULL_ERROR=1) and format the exception here. Set HYDRA_FULL_ERROR=1
yourself to get Hydra's full traceback instead.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, NoReturn

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from gradsweep.cli.plan import confirm_plan, withdraw_plan
from gradsweep.compat.cpython import exit_without_finalization
from gradsweep.compat.hydra import format_help_group_line, help_group_line, is_job_error_preamble
from gradsweep.errors import GradsweepError, JobLost, NonFiniteError, RankLost, RecordingLost, first_line
from gradsweep.run.job import main_thread, raise_terminated
from gradsweep.sweep.hydra_adapter import preflight

EXIT_INPUT = 2
EXIT_FAILED = 1
#: trained, but a run is not on the tracking store yet (spooled: store unreachable or delivery stuck);
#: `gradsweep sync` delivers it. Not 0: a script must not take the results as recorded, not 1: nothing failed
EXIT_SPOOLED = 3


def one_line(e: BaseException) -> str:
    """A single line for a Hydra / OmegaConf / gradsweep error."""
    if isinstance(e, GradsweepError):
        return first_line(e)
    # an unknown option of a config group: Hydra's exception names the group's options (None for
    # any other missing config: the primary one, a config named in a defaults list)
    if isinstance(e, MissingConfigException) and e.options is not None and "/" in (e.missing_cfg_file or ""):
        group, choice = (e.missing_cfg_file or "").rsplit("/", 1)
        options = [o for o in e.options if not o.endswith("_schema")]
        return f"{group}={choice}: unknown option; allowed: {'|'.join(options) or '(none)'}"
    inner = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(inner, OmegaConfBaseException):
        key = getattr(inner, "full_key", None)
        first = first_line(inner)
        return f"{key}: {first}" if key else first
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines)[:500] if lines else type(e).__name__


class _Filtered:
    """A text stream that passes what it is given through ``edit`` first. Hydra writes two things
    straight to sys.stdout/stderr that we reword: the help's option lists and a job error's preamble."""

    def __init__(self, stream, edit: Callable[[str], str]):
        self._stream, self._edit = stream, edit

    def write(self, text: str) -> int:
        edited = self._edit(text)
        if edited:
            self._stream.write(edited)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def without_job_error_preamble(text: str) -> str:
    """Hydra writes "Error executing job with overrides: [...]" before it re-raises a job's
    exception; we report the exception itself (one line for input errors), and the overrides are
    the user's own command line."""
    return "" if is_job_error_preamble(text) else text


def without_schemas(text: str) -> str:
    """``--help`` lists every group's options, the typed schemas (``norm_schema``) among them: those
    are not choices a user makes."""
    lines = []
    for line in text.split("\n"):
        listed = help_group_line(line)
        if listed and any(o.endswith("_schema") for o in listed[1]):
            line = format_help_group_line(listed[0], [o for o in listed[1] if not o.endswith("_schema")])
        lines.append(line)
    return "\n".join(lines)


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
        withdraw_plan()  # bad input is one line: the error, not the plan before it
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    confirm_plan()
    # SIGTERM stops the whole command like Ctrl-C, wherever it arrives (also between the jobs of a
    # sweep, or while a job is still opening its run): runs end KILLED, Optuna trials FAIL
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread() else None
    stdout, stderr = sys.stdout, sys.stderr
    sys.stderr = _Filtered(stderr, without_job_error_preamble)
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        sys.stdout = _Filtered(stdout, without_schemas)
    try:
        main()
        _exit_if_not_recorded()
    except NonFiniteError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except (RecordingLost, JobLost, RankLost) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except (GradsweepError, HydraException, MissingConfigException, OmegaConfBaseException) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except KeyboardInterrupt:
        print(interrupted_text(), file=sys.stderr)
        sys.exit(130)
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupted_text() -> str:
    """What Ctrl-C/SIGTERM left: each run that ended KILLED, where, and the command that resumes it."""
    from gradsweep.run.job import KILLED, called

    if not KILLED:
        return "interrupted (no run was training)"
    lines = ["interrupted:"]
    for k in KILLED:
        how = "resume it from its last checkpoint" if k.resumable else "it has no checkpoint on the store: run it again"
        lines += [f"  run {called(k.name, k.ref)} ended KILLED at step {k.step} of {k.total_steps}; {how}:",
                  f"    {k.command()}"]
    return "\n".join(lines)


def _exit_if_not_recorded() -> None:
    """Runs whose end did not reach the tracking store (each named when its wait ended): exit 3
    (EXIT_SPOOLED), so a script or scheduler never takes a sweep for recorded while its runs are
    still spooled."""
    closing = sys.modules.get("gradsweep.track.closing")
    undelivered = getattr(closing, "UNDELIVERED", None)
    if undelivered:
        print(f"error: {len(undelivered)} run(s) not fully recorded in the tracking store "
              f"({undelivered[-1][1]}); `gradsweep sync` delivers them", file=sys.stderr)
        sys.exit(EXIT_SPOOLED)


def run_as_process(main: Callable[[], object], config_dir: str, config_name: str) -> NoReturn:
    """``python src/train.py``: :func:`run_cli`, then exit without tearing down every module
    (:func:`gradsweep.compat.cpython.exit_without_finalization`: the exit handlers libraries
    registered run, files and streams are flushed; the module-by-module finalization is skipped)."""
    code: int | str | None = 0
    try:
        run_cli(main, config_dir, config_name)
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): Python would print it and exit 1
        print(code, file=sys.stderr)
        code = 1
    exit_without_finalization(code or 0)
