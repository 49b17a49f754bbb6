"""The end of a sweep: a comparison figure and a CSV of every child run, logged to the parent run."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from gradsweep.plots import plot_lines
from gradsweep.spool import RunJournal
from gradsweep.tracker import Tracker

FINAL_METRICS = ("best/dev_acc", "test/acc", "test/loss", "dev/acc", "train/loss", "grad_norm/total")


def child_label(run) -> str:
    return run.data.tags.get("gradsweep.overrides") or run.info.run_name or run.info.run_id[:8]


def differing_params(runs) -> list[str]:
    """Params whose value is not the same in every run (what the sweep varied)."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def summarize_sweep(tracker: Tracker, parent_run_id: str, out_dir: Path, writer: RunJournal) -> tuple[Path, Path] | None:
    """Read the children from the store (``tracker``), write the summary to the parent (``writer``)."""
    runs = tracker.children(parent_run_id)
    if not runs:
        return None
    varied = differing_params(runs)
    label = {r.info.run_id: " ".join(f"{k}={r.data.params.get(k)}" for k in varied) or child_label(r) for r in runs}
    series = {label[r.info.run_id]: tracker.history(r.info.run_id, "grad_norm/total") for r in runs}
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = plot_lines(series, out_dir / "sweep_grad_norm_total.png", "grad_norm/total per run (before clipping)",
                     "global gradient L2 norm")
    table = out_dir / "sweep_runs.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "run_name", "status", "failure", "overrides", *varied, *FINAL_METRICS])
        for r in runs:
            m = r.data.metrics
            w.writerow([r.info.run_id, r.info.run_name, r.info.status, r.data.tags.get("failure", ""),
                        r.data.tags.get("gradsweep.overrides", ""), *(r.data.params.get(k, "") for k in varied),
                        *(m.get(k, "") for k in FINAL_METRICS)])
    writer.log_artifact(fig, "sweep")
    writer.log_artifact(table, "sweep")
    scores = [r.data.metrics["best/dev_acc"] for r in runs
              if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get("best/dev_acc", math.nan))]
    summary = {"sweep/runs": len(runs), "sweep/finished": sum(r.info.status == "FINISHED" for r in runs),
               "sweep/failed": sum(r.info.status == "FAILED" for r in runs)}
    if scores:
        summary["best/dev_acc"] = max(scores)
    writer.log_metrics(0, summary)
    return fig, table
