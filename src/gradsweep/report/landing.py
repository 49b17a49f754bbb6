"""Where a user lands in the MLflow UI (3.x): the routes a sweep's links open, and its parent run's
description (``mlflow.note.content``, markdown), which links the same places, so that a user who
starts from the UI's home page finds them from the sweep's parent run.

Every route carries ``workflowType=machine_learning``: MLflow 3.17 takes the view (GenAI or Model
training) from the URL before the browser's stored choice, and opens GenAI's without either.
Values are JSON, percent-encoded as the UI's own links are: a raw ``"`` ended the link in the
run description's markdown, and in some terminals.
"""
from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote

from gradsweep.names import DEV_ACC, GRAD_TOTAL, SWEEP_TAG

MODEL_TRAINING = "workflowType=machine_learning"
#: what the UI's own "Y-axis Log Scale" switch writes into ``plot_layout``; the switch shows the
#: layout's axis type: with ``y_axis_scale=log`` alone the chart was on a log axis and the switch off
LOG_LAYOUT = {"yaxis": {"type": "log", "autorange": True, "exponentformat": "e"}}
NOTE_MAX = 8000  #: MLflow's limit on a tag value (``MAX_TAG_VAL_LENGTH``)


def _json(value: Any) -> str:
    return quote(json.dumps(value, separators=(",", ":")), safe="")


def runs_route(experiment_id: str, search: Optional[str] = None) -> str:
    """The experiment's runs table, filtered by an MLflow search expression when given."""
    where = f"searchFilter={quote(search, safe='')}&" if search else ""
    return f"#/experiments/{experiment_id}/runs?{where}{MODEL_TRAINING}"


def compare_route(experiment_id: str, run_ids: list[str]) -> str:
    return f"#/compare-runs?runs={_json(run_ids)}&experiments={_json([experiment_id])}&{MODEL_TRAINING}"


def metric_route(experiment_id: str, run_ids: list[str], metric: str, log: bool = False) -> str:
    """The metric page that the comparison's metric names open: one line per run over steps.
    Parameters in the order of MLflow's own ``getMetricPageRoute``."""
    return (f"#/metric?runs={_json(run_ids)}&metric={_json(metric)}&experiments={_json([experiment_id])}"
            f"&plot_metric_keys={_json([metric])}&plot_layout={_json(LOG_LAYOUT if log else {})}&x_axis=step"
            f"&y_axis_scale={'log' if log else 'linear'}&line_smoothness=1&show_point=false"
            f"&deselected_curves={_json([])}&last_linear_y_axis_range={_json([])}&{MODEL_TRAINING}")


def routes(experiment_id: str, run_ids: list[str]) -> dict[str, str]:
    """The routes a sweep prints (after the UI's address): runs view, comparison, grad-norm chart."""
    out = {"runs": runs_route(experiment_id)}
    if len(run_ids) > 1:
        out["comparison"] = compare_route(experiment_id, run_ids)
    if run_ids:
        out["grad norm"] = metric_route(experiment_id, run_ids, GRAD_TOTAL, log=True)
    return out


def parent_note(experiment_id: str, run_ids: list[str], sweep_id: Optional[str] = None) -> str:
    """The sweep parent run's description: links to its children's charts and comparison (first:
    the UI shows a description's first lines only until "Show more"), then where its summary is. A
    sweep too large for links that list every run id (MLflow's limit on a tag) links the runs table
    filtered to the sweep instead."""
    n = len(run_ids)
    table = runs_route(experiment_id, f"tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else None)
    tail = ["", f"This sweep ran {n} run{'s' if n != 1 else ''}. Its summary is in the Artifacts tab: "
            "`sweep/summary.md` (one row per configuration), `sweep/grad_norm_total.png`, `sweep/runs.csv`."]
    links = [f"- [grad_norm/total of every run]({metric_route(experiment_id, run_ids, GRAD_TOTAL, log=True)}) "
             "(before clipping, log scale)"]
    if n > 1:
        links.append(f"- [The {n} runs compared]({compare_route(experiment_id, run_ids)}): params, metrics, charts")
    links += [f"- [{DEV_ACC} of every run]({metric_route(experiment_id, run_ids, DEV_ACC)})",
              f"- [The runs table]({table})" + (" of this sweep" if sweep_id else "")]
    note = "\n".join(links + tail) + "\n"
    if len(note) <= NOTE_MAX:
        return note
    return "\n".join([f"- [The runs table of this sweep]({table}): select its runs, then Compare"] + tail) + "\n"
