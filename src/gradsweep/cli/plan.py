"""The plan, printed before PyTorch and MLflow load (seconds on a small machine): what will run
and where it is recorded, from the command line alone. The full check of every job follows
(preflight); a command line it cannot read gets no plan and preflight's one-line error."""
from __future__ import annotations

import os
from typing import Optional

from gradsweep.names import EMBEDDED_STORE
from gradsweep.sweep.overrides import job_combinations
from gradsweep.track.uri import mask

NO_PLAN = ("-h", "--help", "-hh", "--hydra-help", "-i", "--info", "-c", "--cfg", "-sc", "--shell-completion",
           "-cp", "--config-path", "-cd", "--config-dir", "-cn", "--config-name", "--experimental-rerun")
SERVER = "http://127.0.0.1:5000"  # conf/tracking/server.yaml


def plan(argv: list[str]) -> Optional[str]:
    if any(a.split("=")[0] in NO_PLAN for a in argv):
        return None
    multirun = "-m" in argv or "--multirun" in argv
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        combos = job_combinations(overrides)
    except Exception:  # preflight says what is wrong, in one line
        return None
    given = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    loading = "PyTorch and MLflow" if multirun else "PyTorch"  # a single job's MLflow lives in its delivery process
    if given.get("tracking.backend") == "memory":
        recorded, loading = "recorded nowhere (tracking.backend=memory, a dry run)", "PyTorch"
    else:
        uri = given.get("tracking.uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            (SERVER if given.get("tracking") == "server" else EMBEDDED_STORE)
        recorded = f"recorded in {mask(uri.replace(chr(92), ''))}"
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
