"""Hydra callback: validate before anything is created, and make a ``-m`` sweep one MLflow parent run.

Hydra turns exceptions raised in callbacks into warnings, so input validation cannot live here:
:mod:`gradsweep.preflight` does it before Hydra starts.

* ``on_multirun_start`` opens the parent run and writes ``gradsweep_sweep.<pid>.json`` into the
  sweep folder; jobs (in this process or in launcher workers) find it through an environment
  variable and nest their runs under it.
* ``on_multirun_end`` adds the sweep comparison (figure + CSV) to the parent run and closes it.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gradsweep import job as job_state
from gradsweep.config import to_objects
from gradsweep.sweep_summary import summarize_sweep
from gradsweep.spool import RunJournal
from gradsweep.tracker import SWEEP_TAG, Tracker, close_dead_runs, close_run, open_run, resolve_uri
from gradsweep.tracking_uri import mask, mask_overrides

log = logging.getLogger("gradsweep")
SWEEP_ENV = "GRADSWEEP_SWEEP_FILE"
TAGS_ENV = "GRADSWEEP_RUN_TAGS"  # JSON tags for the parent run (set by gradsweep sweep run / schedule)


def read_sweep_file() -> Optional[dict[str, Any]]:
    path = os.environ.get(SWEEP_ENV)
    if path and Path(path).is_file():
        return json.loads(Path(path).read_text())
    return None


class GradsweepCallback(Callback):
    def __init__(self) -> None:
        self.journal: Optional[RunJournal] = None
        self.tracking = None

    def __getstate__(self) -> dict[str, Any]:
        """Process launchers (joblib) pickle the callbacks for their workers; the parent run's journal
        (an open file) stays with this process, and workers only need the sweep file."""
        return {**self.__dict__, "journal": None, "tracking": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracking = tracking = to_objects(config).tracking
        sweep_id = uuid.uuid4().hex
        overrides = " ".join(mask_overrides(list(config.hydra.overrides.task)))
        tags = {SWEEP_TAG: sweep_id, "gradsweep.role": "sweep", "gradsweep.overrides": overrides,
                "gradsweep.sweeper": str(config.hydra.sweeper.get("_target_", "")),
                **json.loads(os.environ.get(TAGS_ENV) or "{}")}  # e.g. schedule, scheduled_at
        self.journal = open_run(
            tracking.uri, tracking.experiment_name, f"sweep: {overrides}" if overrides else "sweep", tags,
            artifact_location=tracking.artifact_location, spool_dir=tracking.spool_dir)
        run_id = self.journal.run_id
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        info = {"sweep_id": sweep_id, "parent_run_id": run_id,
                "parent_local_id": None if run_id else self.journal.local_id}
        path = sweep_dir / f"gradsweep_sweep.{os.getpid()}.json"  # one per process: workers may share the folder
        path.write_text(json.dumps(info))
        os.environ[SWEEP_ENV] = str(path.resolve())
        log.info("sweep %s: parent run %s in %s", sweep_id[:8], run_id or "(spooled)", mask(tracking.uri))
        if run_id:  # the store is up: close what a killed earlier sweep left RUNNING
            try:
                close_dead_runs(Tracker(tracking.uri, tracking.experiment_name, tracking.artifact_location))
            except Exception as e:
                log.warning("could not check for runs left RUNNING: %s", str(e).splitlines()[0] if str(e) else e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEEP_ENV, None)
        if self.journal is None:
            return
        status = "KILLED" if job_state.interrupted else "FINISHED"
        run_id = self.journal.run_id
        try:
            if run_id:
                tracker = Tracker(self.tracking.uri, self.tracking.experiment_name, self.tracking.artifact_location)
                summarize_sweep(tracker, run_id, Path(str(config.hydra.sweep.dir)), self.journal)
        except Exception as e:  # the children are recorded; a failed summary must not hide that
            log.error("sweep summary failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            close_run(self.journal, status, self.tracking.delivery_timeout_s)
        print_ui_hint(self.journal.run_id and resolve_uri(self.tracking.uri) or self.tracking.uri,
                      self.journal.run_id or self.journal.local_id)


def print_ui_hint(uri: str, run_id: str) -> None:
    if uri.startswith("sqlite:"):
        print(f"\nCompare the runs in the MLflow UI:\n  mlflow ui --backend-store-uri {uri}\n"
              f"then open http://127.0.0.1:5000 (sweep parent run {run_id})", flush=True)
    else:
        print(f"\nCompare the runs at {mask(uri)} (sweep parent run {run_id})", flush=True)
