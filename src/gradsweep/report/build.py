"""``gradsweep report``: figures and a summary table of a sweep, a study or an experiment, from MLflow.

The reference is resolved in this order:

1. a run id: that run's children when it is a sweep parent, else the run itself;
2. a study name (``conf/experiment/<name>.yaml``): the children of the latest sweep launched with
   ``experiment=<name>``;
3. an MLflow experiment name: every training run in it (sweep parents and reports left out).

Written to ``--out`` (default ``reports/<reference>``) and logged to the parent run under
``report/`` (for an experiment, to a new run tagged ``gradsweep.role=report``): the summary of
:mod:`gradsweep.report.summary` (``grad_norm_total.png``, ``summary.md``/``summary.csv`` per
configuration, ``runs.csv`` per run) and

* ``layer_grad_norms.png``: per-layer gradient norms (mean over the first and last steps), for
  layered models (MLP, CNN);
* ``final_accuracy.png``: test and best dev accuracy against the swept value;
* ``epoch_stats.png``: per-epoch weight/gradient mean and std, when the runs logged them.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradsweep.errors import GradsweepError, first_line
from gradsweep.names import BEST_DEV_ACC, EMBEDDED_STORE, OVERRIDES_TAG, PARENT_TAG, ROLE_TAG, RUN_ID, TEST_ACC
from gradsweep.paths import CONF_DIR
from gradsweep.report.summary import UI, Config, group_runs, short_key, ui_command, ui_links, write_summary
from gradsweep.track.create import create_run_once, new_key


class ReportError(GradsweepError):
    """Unknown reference, unreachable store: one line, exit 2."""


@dataclass
class Target:
    title: str
    runs: list
    log_to: Optional[str]  # run id the report is logged to (None: create a report run)
    experiment_id: str
    kind: str  # "sweep" | "run" | "study" | "experiment"


@dataclass
class ReportFiles:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    logged_to: Optional[str] = None
    links: dict[str, str] = field(default_factory=dict)  # into the MLflow UI: the runs view, their comparison


# --------------------------------------------------------------------------- resolving
def study_names(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "experiment").glob("*.yaml"))


def resolve_tracking_uri(uri: Optional[str]) -> str:
    """``--tracking-uri``, else MLFLOW_TRACKING_URI, else the embedded store the trainer uses.
    A local sqlite store must exist (MLflow would silently create an empty one)."""
    from gradsweep.track.uri import absolute_sqlite, check_tracking_uri, is_local_sqlite, sqlite_path

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_STORE
    try:
        check_tracking_uri(uri)
    except GradsweepError as e:
        raise ReportError(str(e).replace("tracking.uri=", "--tracking-uri=")) from None
    if is_local_sqlite(uri):
        path = sqlite_path(absolute_sqlite(uri))
        if not path.is_file():
            raise ReportError(f"--tracking-uri={uri!r}: no tracking store at {path}; "
                              "allowed: an existing sqlite:///path.db or http(s)://host:port")
    return absolute_sqlite(uri)


def _training_runs(runs) -> list:
    return [r for r in runs if r.data.tags.get(ROLE_TAG) not in ("sweep", "report")]


def _launched_with(run, study: str) -> bool:
    return f"experiment={study}" in run.data.tags.get(OVERRIDES_TAG, "").split()


def _children(client, run) -> list:
    runs = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'",
                              max_results=5000, order_by=["attributes.start_time ASC"])
    return _training_runs(runs)


def resolve(client, ref: str, uri: str) -> Target:
    """A run id, a study name or an experiment name -> the runs to report on."""
    from gradsweep.track.uri import mask

    if RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except Exception:
            raise ReportError(f"run {ref!r} not found in {mask(uri)}") from None
        children = _children(client, run)
        if children:
            return Target(run.info.run_name or ref, children, ref, run.info.experiment_id, "sweep")
        return Target(run.info.run_name or ref, [run], ref, run.info.experiment_id, "run")
    experiments = client.search_experiments(max_results=1000)
    if ref in study_names():
        ids = [e.experiment_id for e in experiments]
        parents = client.search_runs(ids, filter_string=f"tags.`{ROLE_TAG}` = 'sweep' AND "
                                                        f"tags.`gradsweep.overrides` LIKE '%experiment={ref}%'",
                                     max_results=1000, order_by=["attributes.start_time DESC"])
        for parent in (p for p in parents if _launched_with(p, ref)):
            children = _children(client, parent)
            if children:
                return Target(f"{ref} (sweep {parent.info.run_id[:8]})", children, parent.info.run_id,
                              parent.info.experiment_id, "study")
        raise ReportError(f"study {ref!r} has no sweep with runs in {mask(uri)}; "
                          f"run it first: python src/train.py -m experiment={ref}")
    by_name = {e.name: e for e in experiments}
    if ref in by_name:
        exp = by_name[ref]
        runs = _training_runs(client.search_runs([exp.experiment_id], max_results=5000,
                                                 order_by=["attributes.start_time ASC"]))
        if not runs:
            raise ReportError(f"experiment {ref!r} has no training runs in {mask(uri)}")
        return Target(f"experiment {ref}", runs, None, exp.experiment_id, "experiment")
    raise ReportError(f"{ref!r} is not a run id, study or experiment in {mask(uri)}; allowed: a 32-hex run id, "
                      f"a study ({'|'.join(study_names())}) or an experiment ({'|'.join(sorted(by_name)) or 'none'})")


# ----------------------------------------------------------------------------- reading
_histories: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    """Every step of a run's metric: from its dense history (``telemetry/``) where it has the key,
    else MLflow's metric history (see :class:`gradsweep.track.history.Histories`)."""
    from gradsweep.track.history import Histories

    if client not in _histories:
        _histories[client] = Histories(client)
    return _histories[client].series(run_id, key)


def _value(text: Optional[str]) -> Any:
    """A param string as a number when it is one (for the accuracy axis)."""
    if text is None:
        return "-"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# ------------------------------------------------------------------------------ figures
def _layer_panels(client, configs: list[Config], steps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per configuration and layer: the mean weight-gradient norm over the first and the last
    ``steps`` steps, the median of that over the configuration's seeds."""
    from gradsweep.train.diagnostics import layer_weights

    first: dict[str, dict[str, float]] = {}
    last: dict[str, dict[str, float]] = {}
    for config in configs:
        params = [k.removeprefix("grad_norm/") for k in config.runs[0].data.metrics if k.startswith("grad_norm/")]
        layers = layer_weights(params)
        if not layers:
            continue
        first[config.label], last[config.label] = {}, {}
        for layer in layers:
            heads, tails = [], []
            for r in config.runs:
                _, values = history(client, r.info.run_id, f"grad_norm/{layer}")
                values = [v for v in values if math.isfinite(v)]
                if values:
                    heads.append(sum(values[:steps]) / len(values[:steps]))
                    tails.append(sum(values[-steps:]) / len(values[-steps:]))
            if heads:
                first[config.label][layer] = statistics.median(heads)
                last[config.label][layer] = statistics.median(tails)
    if not first:
        return {}
    seeds = " (median over seeds)" if any(len(c.runs) > 1 for c in configs) else ""
    return {f"mean over the first {steps} steps{seeds}": first, f"mean over the last {steps} steps{seeds}": last}


def _accuracy_points(configs: list[Config]) -> tuple[str, dict[str, list]]:
    """x = the swept param with the most distinct (numeric first) values; series = the others.
    A point per configuration: (x, test median, best dev median, test min, test max) over its seeds."""
    keys = list(configs[0].values) if configs else []
    if not keys:
        x_key = None
    else:
        def rank(k):
            vals = [_value(c.values[k]) for c in configs]
            return (all(isinstance(v, (int, float)) for v in vals), len(set(map(str, vals))))
        x_key = max(keys, key=rank)
    points: dict[str, list] = {}
    for c in configs:
        test, dev = c.metric(TEST_ACC), c.metric(BEST_DEV_ACC)
        if not test:
            continue
        series = " ".join(f"{short_key(k)}={c.values[k]}" for k in keys if k != x_key)
        x = _value(c.values[x_key]) if x_key else c.label
        points.setdefault(series, []).append((x, statistics.median(test), statistics.median(dev) if dev else math.nan,
                                              min(test), max(test)))
    return (short_key(x_key) if x_key else "run"), points


def _epoch_stats(client, configs: list[Config]) -> dict[str, dict[str, dict[str, tuple[list, list]]]]:
    """Per configuration, stat and layer: the per-epoch median over its seeds."""
    out: dict[str, dict[str, dict[str, tuple[list, list]]]] = {}
    for config in configs:
        keys = [k for k in config.runs[0].data.metrics
                if k.startswith(("weight_mean/", "weight_std/", "grad_mean/", "grad_std/")) and k.endswith(".weight")]
        if not keys:
            continue
        by_stat: dict[str, dict[str, tuple[list, list]]] = {}
        for k in sorted(keys):
            stat, layer = k.split("/", 1)
            series = [history(client, r.info.run_id, k)[1] for r in config.runs]
            n = min(len(s) for s in series)
            values = [statistics.median(s[i] for s in series) for i in range(n)]
            by_stat.setdefault(stat, {})[layer] = (list(range(1, n + 1)), values)
        label = config.label + (f" (median of {len(config.runs)} seeds)" if len(config.runs) > 1 else "")
        out[label] = by_stat
    return out


# ---------------------------------------------------------------------------- the report
def build_report(client, target: Target, out_dir: Path, steps: int = 10) -> ReportFiles:
    from gradsweep.report.figures import plot_epoch_stats, plot_layer_bars, plot_metric_vs_value

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = target.runs
    configs = group_runs(runs)
    rep = ReportFiles(out_dir)
    rep.files.update(write_summary(runs, out_dir, lambda run_id, key: history(client, run_id, key), target.title))
    panels = _layer_panels(client, configs, steps)
    if panels:
        rep.files["layer_grad_norms"] = plot_layer_bars(panels, out_dir / "layer_grad_norms.png",
                                                        f"{target.title}: per-layer weight gradient norms")
    x_label, points = _accuracy_points(configs)
    if points:
        rep.files["final_accuracy"] = plot_metric_vs_value(points, out_dir / "final_accuracy.png",
                                                           f"{target.title}: final accuracy", x_label)
    stats = _epoch_stats(client, configs)
    if stats:
        rep.files["epoch_stats"] = plot_epoch_stats(stats, out_dir / "epoch_stats.png",
                                                    f"{target.title}: per-epoch weight / gradient statistics")
    return rep


def log_report(client, target: Target, rep: ReportFiles, ref: str) -> str:
    run_id = target.log_to
    if run_id is None:
        run_id = create_run_once(client, target.experiment_id, new_key(), run_name=f"report: {ref}",
                                 tags={ROLE_TAG: "report"})
        client.log_artifacts(run_id, str(rep.out_dir), "report")
        client.set_terminated(run_id, "FINISHED")
    else:
        client.log_artifacts(run_id, str(rep.out_dir), "report")
    rep.logged_to = run_id
    return run_id


def make_report(ref: str, tracking_uri: Optional[str] = None, out: Optional[str] = None, steps: int = 10,
                log: bool = True) -> ReportFiles:
    from gradsweep.track.delivery import mlflow_client
    from gradsweep.track.uri import mask

    uri = resolve_tracking_uri(tracking_uri)
    client = mlflow_client(uri)
    try:
        target = resolve(client, ref, uri)
    except GradsweepError:
        raise
    except Exception as e:
        raise ReportError(f"cannot read the tracking store {mask(uri)}: {first_line(e, 200)}") from None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref)
    rep = build_report(client, target, Path(out) if out else Path("reports") / safe, steps)
    rep.links = ui_links(uri, target.experiment_id, [r.info.run_id for r in target.runs])
    if log:
        log_report(client, target, rep, ref)
    return rep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref",
                   help="a sweep parent run id, a study name (conf/experiment/*.yaml) or an MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help=f"tracking store (default: $MLFLOW_TRACKING_URI, else {EMBEDDED_STORE}, as the trainer)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<ref>)")
    p.add_argument("--steps", type=int, default=10, help="steps averaged for the per-layer bars (first and last)")
    p.add_argument("--no-log", action="store_true", help="write the files only; do not log them to MLflow")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ReportError(f"--steps={args.steps} is invalid; allowed: an integer >= 1")
    rep = make_report(args.ref, args.tracking_uri, args.out, args.steps, log=not args.no_log)
    print(f"report of {args.ref}: {len(rep.files)} files in {rep.out_dir}")
    for path in rep.files.values():
        print(f"  {path}")
    if rep.logged_to:
        print(f"logged to run {rep.logged_to} under report/")
    print("in the MLflow UI" + (f" (after {ui_command(resolve_tracking_uri(args.tracking_uri))})"
                                if rep.links["runs"].startswith(UI) else "") + ":")
    for name, link in rep.links.items():
        print(f"  {name + ':':<11} {link}")
    return 0
