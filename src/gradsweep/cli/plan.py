"""The plan, printed before PyTorch and MLflow load (seconds of imports): what will run
and where it is recorded, from the command line and the config files it names. The full check of
every job follows (preflight); a command line it cannot read, or that names a config option or sweep
that does not exist, gets no plan, only preflight's one-line error.

Bad input must print one line: on a terminal the plan shows at once and is erased when preflight
rejects the command line (:func:`withdraw_plan`); elsewhere (a pipe, a log file) it is held back
until preflight accepts it (:func:`confirm_plan`)."""
from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from gradsweep.names import EMBEDDED_STORE
from gradsweep.paths import CONF_DIR, SWEEPS_DIR
from gradsweep.sweep.overrides import job_combinations, output_folder
from gradsweep.track.uri import mask

NO_PLAN = ("-h", "--help", "-hh", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc", "--shell-completion",
           "-cp", "--config-path", "-cd", "--config-dir", "-cn", "--config-name", "--experimental-rerun")
SERVER = "http://127.0.0.1:5000"  # conf/tracking/server.yaml


def _option_file(group: str, option: str) -> Optional[Path]:
    """The YAML file of a config-group choice of ours (``conf/<group>/``, ``sweeps/``); None for keys
    that are no such group (plain values, Hydra's own groups)."""
    if group == "sweep":
        folder = Path(os.environ["GRADSWEEP_SWEEPS_DIR"]) if os.environ.get("GRADSWEEP_SWEEPS_DIR") else SWEEPS_DIR
    elif group and not group.startswith("hydra") and (CONF_DIR / group).is_dir():
        folder = CONF_DIR / group
    else:
        return None
    return folder / f"{option}.yaml"


def _preset_params(combo: list[str]) -> list[str]:
    """The discrete ``hydra.sweeper.params`` of the ``experiment=`` preset a job names that its
    command line does not set (what preflight's expansion adds: gradsweep.sweep.hydra_adapter._jobs)."""
    chosen = dict(o.lstrip("+~").split("=", 1) for o in combo if "=" in o)
    path = _option_file("experiment", chosen.get("experiment", "null"))
    if path is None or not path.is_file():
        return []
    import yaml  # light, and already loaded by Hydra's parser (through OmegaConf)

    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    return [f"{k}={v}" for k, v in params.items() if k not in chosen]


def _given(argv: list[str]) -> Optional[tuple[bool, list, dict[str, str], Optional[str]]]:
    """(multirun, the discrete job combinations, key -> value given, the output folder given) or None (no plan)."""
    if any(a.split("=")[0] in NO_PLAN for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    multirun = "-m" in argv or "--multirun" in argv
    try:
        combos = job_combinations(overrides)
        for key, value in (o.lstrip("+~").split("=", 1) for combo in combos for o in combo if "=" in o):
            path = _option_file(key, value)
            if path is not None and value != "null" and not path.is_file():
                return None  # an unknown option: preflight names it and the allowed ones
        if multirun:
            combos = [c + extra for c in combos for extra in job_combinations(_preset_params(c))]
    except Exception:  # preflight says what is wrong, in one line
        return None
    given = {k: v.replace("\\", "") for k, v in (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)}
    return multirun, combos, given, output_folder(overrides, multirun)


def _store(given: dict[str, str]) -> Optional[str]:
    if given.get("tracking.backend") == "memory":
        return None
    return given.get("tracking.uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
        (SERVER if given.get("tracking") == "server" else EMBEDDED_STORE)


def plan(argv: list[str]) -> Optional[str]:
    parsed = _given(argv)
    if parsed is None:
        return None
    multirun, combos, given, folder = parsed
    loading = "PyTorch and MLflow" if multirun else "PyTorch"  # a single job's MLflow lives in its delivery process
    uri = _store(given)
    if uri is None:
        recorded, loading = "recorded nowhere (tracking.backend=memory, a dry run)", "PyTorch"
    else:
        recorded = f"recorded in {mask(uri)}"
    if not multirun:
        jobs, files = "1 job", "outputs/"
    elif "sweep" in given:
        jobs, files = f"the Optuna sweep {given['sweep']} (sweeps/{given['sweep']}.yaml)", "multirun/"
    else:
        n = len(combos)
        jobs = f"{n} job{'s' if n != 1 else ''}" + (f" of experiment={given['experiment']}'s sweep"
                                                    if "experiment" in given else "")
        files = "multirun/"
    if folder is not None:  # hydra.run.dir / hydra.sweep.dir: where the files really go
        files = folder.rstrip("/") + "/"
    return f"[gradsweep] {jobs}, {recorded}, files under {files}; loading {loading}..."


_shown: Optional[str] = None  #: the plan on a terminal, until preflight accepts the command line
_held: Optional[str] = None  #: the plan held back (not a terminal), until preflight accepts it


def print_plan(argv: list[str]) -> None:
    global _shown, _held
    text = plan(argv)
    if not text:
        return
    if sys.stdout.isatty():
        print(text, flush=True)
        _shown = text
    else:  # printed by confirm_plan, when PyTorch is loaded already
        _held = text.rsplit("; loading", 1)[0]


def confirm_plan() -> None:
    """Preflight accepted the command line: the plan stays (or is printed now)."""
    global _shown, _held
    if _held:
        print(_held, flush=True)
    _shown = _held = None


def withdraw_plan() -> None:
    """Preflight rejected the command line: its one-line error is all that is left to read."""
    global _shown, _held
    if _shown:  # cursor up over the plan's rows (long lines wrap), then clear to the end of the screen
        rows = max(1, math.ceil(len(_shown) / max(1, shutil.get_terminal_size().columns)))
        sys.stdout.write(f"\x1b[{rows}F\x1b[J")
        sys.stdout.flush()
    _shown = _held = None


def start_delivery(argv: list[str]) -> None:
    """Start the run's delivery process now, so that its MLflow import (seconds) overlaps the job's
    PyTorch import instead of following it: the job's end waits for that process. The job finds it
    running for the same spool folder (``DeliveryWorker.ensure``); it creates nothing by itself."""
    parsed = _given(argv)
    uri = _store(parsed[2]) if parsed is not None else None
    if parsed is None or uri is None:
        return
    from gradsweep.track.journal import default_spool_dir
    from gradsweep.track.worker import DeliveryWorker
    from gradsweep.track.uri import absolute_sqlite

    spool_dir = parsed[2].get("tracking.spool_dir")
    DeliveryWorker.ensure(Path(spool_dir) if spool_dir else default_spool_dir(absolute_sqlite(uri)), uri)
