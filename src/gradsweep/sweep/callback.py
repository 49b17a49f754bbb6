"""Hydra callback: validate before anything is created, and make a ``-m`` sweep one MLflow parent run.

Hydra turns exceptions raised in callbacks into warnings, so input validation cannot live here:
:func:`gradsweep.sweep.hydra_adapter.preflight` does it before Hydra starts.

* ``on_multirun_start`` opens the parent run and installs the sweep's
  :class:`~gradsweep.sweep.context.SweepContext`; every job nests its run under the parent.
* ``on_multirun_end`` adds the sweep comparison (figure + CSV) to the parent run and closes it.
"""
from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gradsweep.names import OUTPUT_DIR_TAG, OVERRIDES_TAG, ROLE_TAG, SWEEP_TAG, SWEEPER_TAG
from gradsweep.report.hooks import sweep_summary
from gradsweep.report.summary import UI, ui_command, ui_links
from gradsweep.run.job import run_name
from gradsweep.sweep.context import SweepContext
from gradsweep.sweep.hydra_adapter import constant_keys, tracking_spec
from gradsweep.track.uri import is_local_sqlite, mask, mask_overrides

if TYPE_CHECKING:
    from gradsweep.track.settings import TrackingConfig
    from gradsweep.track.mlflow_run import MlflowRun

log = logging.getLogger("gradsweep")


class GradsweepCallback(Callback):
    def __init__(self) -> None:
        self.journal: Optional[MlflowRun] = None  # the parent run
        self.tracking: Optional[TrackingConfig] = None
        self.outer: Optional[SweepContext] = None  # the context before this sweep (parent tags from a scheduler)

    def __getstate__(self) -> dict[str, Any]:
        """Process launchers (joblib) pickle the callbacks for their workers; the parent run's journal
        (an open file) stays with this process; workers get the sweep's context with each job."""
        return {**self.__dict__, "journal": None, "tracking": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.tracking = tracking = tracking_spec(config)
        if tracking.backend != "mlflow":  # a dry run (tracking.backend=memory) has no parent run
            return
        self.outer = outer = SweepContext.current()
        sweep_id = uuid.uuid4().hex
        overrides = " ".join(mask_overrides(list(config.hydra.overrides.task)))
        tags = {SWEEP_TAG: sweep_id, ROLE_TAG: "sweep", OVERRIDES_TAG: overrides,
                SWEEPER_TAG: str(config.hydra.sweeper.get("_target_", "")),
                OUTPUT_DIR_TAG: str(Path(str(config.hydra.sweep.dir)).resolve()),
                **(outer.parent_tags if outer else {})}  # e.g. schedule, scheduled_at
        from gradsweep.track.mlflow_run import open_run
        from gradsweep.track.ownership import close_dead_runs_hook

        # Jobs of Hydra's basic launcher run in this process and find the parent's journal in the
        # same spool: the delivery process creates the parent, and this process never loads MLflow
        # (an import of seconds). Jobs elsewhere (joblib, Slurm) need its id now.
        local_jobs = str(config.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher") and \
            str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")
        self.journal = open_run(tracking, "sweep: " + run_name(mask_overrides(list(config.hydra.overrides.task))), tags,
                                create_now=not local_jobs, hooks=(close_dead_runs_hook, sweep_summary))
        run_id = self.journal.run_id
        (outer or SweepContext()).with_(sweep_id=sweep_id, parent_run_id=run_id,
                                        parent_local_id=None if run_id else self.journal.local_id,
                                        constant_keys=constant_keys(list(config.hydra.overrides.task))).install()
        log.info("sweep %s: parent run %s in %s", sweep_id[:8], run_id or "(created by the delivery process)",
                 mask(tracking.uri))
        # once the store has the parent: close what a killed earlier sweep left RUNNING
        self.journal.after_delivery(close_dead_runs_hook)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepContext.uninstall(self.outer)
        if self.journal is None:
            return
        # Hydra calls this from a `finally`: a Ctrl-C/SIGTERM that ended the sweep is still in flight
        status = "KILLED" if isinstance(sys.exc_info()[1], KeyboardInterrupt) else "FINISHED"
        assert self.tracking is not None  # set with the journal by on_multirun_start
        # the summary is made where the parent is delivered, once its children are on the store
        self.journal.after_delivery(sweep_summary, out_dir=str(Path(str(config.hydra.sweep.dir)).resolve()),
                                    keep_local=self.tracking.keep_local_artifacts)
        delivered = self.journal.finish(status)
        run_id = self.journal.run_id
        if not delivered or not run_id:  # not all on the store: say which runs and why
            _say_not_recorded(self.journal)
            return
        summary = self.journal.hook_result(sweep_summary) or {}
        if summary.get("error"):
            log.error("sweep summary failed: %s", summary["error"])
        if summary.get("table"):  # what each configuration did, before where to look at it
            print("\n" + summary["table"], flush=True)
        from gradsweep.track.uri import absolute_sqlite

        assert self.tracking is not None  # set by on_multirun_start
        print_ui_hint(absolute_sqlite(self.tracking.uri), run_id, summary.get("experiment_id"),
                      summary.get("children"))


def _say_not_recorded(journal) -> None:
    """The sweep ends before its runs are all on the store: name each run still spooled and why."""
    from gradsweep.track.journal import HEADER, read_json
    from gradsweep.track.closing import UNDELIVERED
    from gradsweep.track.ownership import children_pending

    folder = journal.journal.folder
    reason = UNDELIVERED[-1][1] if UNDELIVERED else "the tracking store did not answer"
    left = [(read_json(child / HEADER) or {}).get("create", {}).get("run_name") or child.name
            for child in children_pending(folder, journal.run_id)]
    UNDELIVERED.extend((name, reason) for name in left)  # the command's last line counts them too
    runs = f"{len(left)} of its runs ({', '.join(left[:5])}{', ...' if len(left) > 5 else ''}) and " if left else ""
    print(f"\nThe sweep is not fully recorded: {runs}its parent run are still in {folder.parent} ({reason}). "
          "Run `gradsweep sync`" + (" when the store is back" if "did not answer" in reason else "") +
          ": it delivers the runs and the sweep's summary and prints the sweep's parent run id.", flush=True)


def print_ui_hint(uri: str, run_id: str, experiment_id: Optional[str] = None, children: Optional[list] = None) -> None:
    """Where to look: the UI command for an embedded store, and links that open the runs view and
    the comparison of the sweep's children directly."""
    local = is_local_sqlite(uri)
    lines = ["", "Compare the runs in the MLflow UI:"]
    if local:
        lines.append(f"  {ui_command(uri)}")
    if experiment_id is not None:
        lines.append(("then open" if local else "open") + f" (sweep parent run {run_id}):")
        lines += [f"  {name + ':':<11} {link}" for name, link in ui_links(uri, experiment_id, children or []).items()]
    else:
        lines.append(f"  {UI if local else mask(uri)} (sweep parent run {run_id}; its summary failed: "
                     f"gradsweep report {run_id})")
    print("\n".join(lines), flush=True)
