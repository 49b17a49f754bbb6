"""The plan, printed before PyTorch and MLflow load (seconds on a small machine): what will run
and where it is recorded, from the command line alone. The full check of every job follows
(preflight); a command line it cannot read gets no plan and preflight's one-line error."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from gradsweep.names import EMBEDDED_STORE
from gradsweep.sweep.overrides import job_combinations
from gradsweep.track.uri import mask

NO_PLAN = ("-h", "--help", "-hh", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc", "--shell-completion",
           "-cp", "--config-path", "-cd", "--config-dir", "-cn", "--config-name", "--experimental-rerun")
SERVER = "http://127.0.0.1:5000"  # conf/tracking/server.yaml


def _given(argv: list[str]) -> Optional[tuple[bool, list, dict[str, str]]]:
    """(multirun, the discrete job combinations, key -> value given) or None (no plan)."""
    if any(a.split("=")[0] in NO_PLAN for a in argv):
        return None
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        combos = job_combinations(overrides)
    except Exception:  # preflight says what is wrong, in one line
        return None
    given = {k: v.replace("\\", "") for k, v in (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)}
    return "-m" in argv or "--multirun" in argv, combos, given


def _store(given: dict[str, str]) -> Optional[str]:
    if given.get("tracking.backend") == "memory":
        return None
    return given.get("tracking.uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
        (SERVER if given.get("tracking") == "server" else EMBEDDED_STORE)


def plan(argv: list[str]) -> Optional[str]:
    parsed = _given(argv)
    if parsed is None:
        return None
    multirun, combos, given = parsed
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
    return f"[gradsweep] {jobs}, {recorded}, files under {files}; loading {loading}..."


def print_plan(argv: list[str]) -> None:
    text = plan(argv)
    if text:
        print(text, flush=True)


def start_delivery(argv: list[str]) -> None:
    """Start the run's delivery process now, so that its MLflow import (~2 s) overlaps the job's
    PyTorch import instead of following it: the job's end waits for that process. The job finds it
    running for the same spool folder (``DeliveryWorker.ensure``); it creates nothing by itself."""
    parsed = _given(argv)
    uri = _store(parsed[2]) if parsed else None
    if uri is None:
        return
    from gradsweep.track.journal import default_spool_dir
    from gradsweep.track.store import DeliveryWorker
    from gradsweep.track.uri import absolute_sqlite

    spool_dir = parsed[2].get("tracking.spool_dir")
    DeliveryWorker.ensure(Path(spool_dir) if spool_dir else default_spool_dir(absolute_sqlite(uri)), uri)
