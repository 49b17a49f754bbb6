"""The report layer's delivery hooks (:mod:`gradsweep.track.hooks`): a job's per-parameter figure and
a sweep's summary, made by whichever process delivers the run's journal, once what they read is on
the store. A job and a sweep import this module to hand the hooks to their journals; it stays light
(no matplotlib, no MLflow): the work is imported when a hook runs, in the delivery process, which
imports the modules each hook names ahead (while it waits for the run's records).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gradsweep.track.hooks import delivery_hook


@delivery_hook("gradsweep.report.figures")
def run_figure(header: dict[str, Any], run_id: str, folder: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`gradsweep.report.figures.run_figure_hook`."""
    from gradsweep.report.figures import run_figure_hook

    return run_figure_hook(header, run_id, folder, **kwargs)


@delivery_hook("gradsweep.report.summary", "gradsweep.report.figures")
def sweep_summary(header: dict[str, Any], run_id: str, folder: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`gradsweep.report.summary.sweep_summary_hook`."""
    from gradsweep.report.summary import sweep_summary_hook

    return sweep_summary_hook(header, run_id, folder, **kwargs)
