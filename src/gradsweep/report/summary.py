"""The one summary of a set of runs: what the sweep's parent run, the Optuna sweeper's parent run and
``gradsweep report`` all write.

Runs that differ only by ``trainer.seed`` are one *configuration*. Files:

* ``runs.csv``: one row per run (status, verdict, seed, the varied params, final and ``health/*`` metrics);
* ``summary.csv`` and ``summary.md``: one row per configuration with ``n_runs`` and, for test
  accuracy, best dev accuracy and peak gradient norm, ``<name>_median``, ``_min``, ``_max``, and
  how many of its runs got each verdict;
* ``grad_norm_total.png``: ``grad_norm/total`` per configuration, the median over its seeds as a
  line and the min-max band around it (one line per run when every configuration has one run).
"""
from __future__ import annotations

import csv
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from gradsweep.labels import short_value
from gradsweep.names import (BEST_DEV_ACC, FAILURE_TAG, GRAD_TOTAL, HEALTH_TAG, NOTE_TAG, OVERRIDES_TAG, SWEEP_TAG,
                             TEST_ACC, TEST_LOSS)
from gradsweep.train.sinks import Series

SEED = "trainer.seed"
IGNORED_PARAMS = ("tracking.", "trainer.resume_from", "trainer.device", "trainer.cpu_threads", "schedule")
PEAK = "health/peak_grad_norm"
VANISHING_FRAC = "health/vanishing_frac/"  #: + <param>: one column per parameter in runs.csv
HEALTH_METRICS = (PEAK, "health/peak_step", "health/growth_ratio", "health/spike_count", "health/median_grad_norm",
                  "health/clipped_frac", "health/vanishing_frac_max", "health/first_last_ratio",
                  "health/dead_relu_frac", "health/hidden_unit_spread")
RUN_METRICS = (BEST_DEV_ACC, TEST_ACC, TEST_LOSS, *HEALTH_METRICS)
SPREAD = {"test_acc": TEST_ACC, "best_dev_acc": BEST_DEV_ACC, "peak_grad_norm": PEAK}


# ----------------------------------------------------------------------------- params
def differing_params(runs) -> list[str]:
    """Params whose value is not the same in every run (what the sweep varied)."""
    keys = sorted({k for r in runs for k in r.data.params})
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def varied_params(runs) -> list[str]:
    """The params that differ between the runs, without bookkeeping keys and without keys that
    only follow a group choice (``clip.max_norm`` None/20 alongside ``clip.name`` none/norm)."""
    varied = [k for k in differing_params(runs) if not k.startswith(IGNORED_PARAMS)]
    out = []
    for k in varied:
        group = k.rsplit(".", 1)[0] + ".name"
        if group != k and group in varied:
            pairs = {(r.data.params.get(group), r.data.params.get(k)) for r in runs}
            if len(pairs) == len({r.data.params.get(group) for r in runs}):
                continue
        out.append(k)
    return out


def short_key(key: str) -> str:
    """``clip.name`` -> ``clip`` (the group choice); other keys unchanged."""
    return key.removesuffix(".name")


def child_label(run) -> str:
    return run.data.tags.get(OVERRIDES_TAG) or run.info.run_name or run.info.run_id[:8]


# ------------------------------------------------------------------------------ groups
@dataclass
class Config:
    """Runs that differ only by seed."""

    label: str
    values: dict[str, str]  # varied param (seed excluded) -> value
    runs: list = field(default_factory=list)

    def metric(self, key: str) -> list[float]:
        """Finite values of a final metric over the configuration's finished runs."""
        return [r.data.metrics[key] for r in self.runs
                if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(key, math.nan))]

    def verdicts(self) -> Counter:
        return Counter(v for r in self.runs for v in (r.data.tags.get(HEALTH_TAG) or "-").split(","))


def group_runs(runs, varied: Optional[list[str]] = None) -> list[Config]:
    varied = varied_params(runs) if varied is None else varied
    keys = [k for k in varied if k != SEED]
    groups: dict[tuple, Config] = {}
    for r in runs:
        values = {k: r.data.params.get(k, "-") for k in keys}
        key = tuple(values.values())
        if key not in groups:
            label = " ".join(f"{short_key(k)}={v}" for k, v in values.items()) or \
                " ".join(o for o in child_label(r).split() if not o.startswith(f"{SEED}=")) or child_label(r)
            groups[key] = Config(label, values)
        groups[key].runs.append(r)
    return list(groups.values())


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max); NaNs when there is no value."""
    if not values:
        return math.nan, math.nan, math.nan
    return statistics.median(values), min(values), max(values)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def fmt_spread(values: list[float]) -> str:
    """``median [min-max]`` (one value: that value)."""
    med, lo, hi = spread(values)
    if math.isnan(med):
        return "-"
    return fmt(med) if len(values) == 1 else f"{fmt(med)} [{fmt(lo)}-{fmt(hi)}]"


def verdict_text(counts: Counter, n: int) -> str:
    """``exploding 5/5, vanishing 3/5`` (``ok`` counted too)."""
    return ", ".join(f"{v} {c}/{n}" for v, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# ------------------------------------------------------------------------------- files
def write_runs_csv(runs, varied: list[str], path: Path) -> Path:
    per_param = sorted({k for r in runs for k in r.data.metrics if k.startswith(VANISHING_FRAC)})
    metrics = [*RUN_METRICS, *per_param]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_id", "run_name", "status", "failure", HEALTH_TAG, "overrides", SEED,
                    *[k for k in varied if k != SEED], *metrics])
        for r in runs:
            m = r.data.metrics
            w.writerow([r.info.run_id, r.info.run_name, r.info.status, r.data.tags.get(FAILURE_TAG, ""),
                        r.data.tags.get(HEALTH_TAG, ""), r.data.tags.get(OVERRIDES_TAG, ""),
                        r.data.params.get(SEED, ""),
                        *(r.data.params.get(k, "") for k in varied if k != SEED), *(m.get(k, "") for k in metrics)])
    return path


def summary_rows(configs: list[Config]) -> list[list[str]]:
    """The cells of summary.md, one row per configuration: label, runs, finished, grad_health, then
    ``median [min-max]`` of test accuracy, best dev accuracy and peak norm (the console table's too)."""
    return [[c.label, str(len(c.runs)), str(sum(r.info.status == "FINISHED" for r in c.runs)),
             verdict_text(c.verdicts(), len(c.runs)), *(fmt_spread(c.metric(m)) for m in SPREAD.values())]
            for c in configs]


CONSOLE_ROWS = 15  #: a sweep of more configurations shows its best CONSOLE_BEST on the console
CONSOLE_BEST = 10
CONSOLE_LABEL = 60  #: characters of a configuration's label on the console


def _short_label(label: str) -> str:
    """Floats of a label to 3 significant digits (Optuna draws 16), then at most CONSOLE_LABEL characters."""
    text = short_value(label)
    return text if len(text) <= CONSOLE_LABEL else text[:CONSOLE_LABEL - 3] + "..."


def console_table(configs: list[Config], csv_path: Path) -> str:
    """summary.md's numbers as the lines a sweep ends with: per configuration its peak norm before
    clipping, verdict, best dev accuracy and test accuracy (``median [min-max]`` over seeds), and how
    many of its runs finished. Beyond CONSOLE_ROWS configurations, the best CONSOLE_BEST by median best
    dev accuracy, and how many more are in ``csv_path``."""
    rows = summary_rows(configs)
    shown = list(range(len(rows)))
    if len(rows) > CONSOLE_ROWS:
        score = [spread(c.metric(BEST_DEV_ACC))[0] for c in configs]
        shown = sorted(shown, key=lambda i: -score[i] if math.isfinite(score[i]) else math.inf)[:CONSOLE_BEST]
    table = [["configuration", "finished", "peak grad norm", "grad_health", "best dev acc", "test acc"]]
    table += [[_short_label(rows[i][0]), f"{rows[i][2]}/{rows[i][1]}", rows[i][6], rows[i][3], rows[i][5], rows[i][4]]
              for i in shown]
    widths = [max(len(r[k]) for r in table) for k in range(len(table[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    many = any(len(c.runs) > 1 for c in configs)
    head = f"Sweep summary ({len(configs)} configuration{'s' if len(configs) != 1 else ''}" + \
        (", median [min-max] over seeds" if many else "") + "; peak grad norm: before clipping):"
    tail = [f"  ... and {len(rows) - len(shown)} more configurations: {csv_path}"] if len(shown) < len(rows) else []
    return "\n".join([head, *lines, *tail])


def write_summary_tables(configs: list[Config], out_dir: Path) -> tuple[Path, Path]:
    keys = list(configs[0].values) if configs else []
    csv_path = out_dir / "summary.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", *keys, "n_runs", "n_finished", HEALTH_TAG,
                    *(f"{name}_{s}" for name in SPREAD for s in ("median", "min", "max"))])
        for c in configs:
            n_finished = sum(r.info.status == "FINISHED" for r in c.runs)
            w.writerow([c.label, *(c.values[k] for k in keys), len(c.runs), n_finished,
                        verdict_text(c.verdicts(), len(c.runs)),
                        *(x for metric in SPREAD.values() for x in spread(c.metric(metric)))])
    md = ["| configuration | runs | finished | grad_health | test acc | best dev acc | peak grad norm |",
          "|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(row) + " |" for row in summary_rows(configs)]
    md.append("")
    md.append("Values are `median [min-max]` over the configuration's finished runs (seeds).")
    md_path = out_dir / "summary.md"
    md_path.write_text("\n".join(md) + "\n")
    return md_path, csv_path


def band(series: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps where every run has a finite value, with the median, min and max there."""
    common = None
    maps = []
    for steps, values in series:
        m = {s: v for s, v in zip(steps, values, strict=True) if math.isfinite(v)}
        maps.append(m)
        common = set(m) if common is None else common & set(m)
    steps = sorted(common or ())
    rows = [[m[s] for m in maps] for s in steps]
    return steps, [statistics.median(r) for r in rows], [min(r) for r in rows], [max(r) for r in rows]


def write_summary(runs, out_dir: Path, history: Callable[[str, str], Series], title: str = "") -> dict[str, Path]:
    """Every file of the summary (see the module docstring) for ``runs``; ``history(run_id, key)``
    reads a metric's history. Returns name -> path."""
    return _write_summary(runs, out_dir, history, title)[0]


def _write_summary(runs, out_dir: Path, history: Callable[[str, str], Series],
                   title: str = "") -> tuple[dict[str, Path], list[Config]]:
    from gradsweep.report.figures import plot_bands

    out_dir.mkdir(parents=True, exist_ok=True)
    varied = varied_params(runs)
    configs = group_runs(runs, varied)
    curves = {c.label: band([history(r.info.run_id, GRAD_TOTAL) for r in c.runs]) for c in configs}
    scores = {c.label: spread(c.metric(BEST_DEV_ACC))[0] for c in configs}  # many configurations: coloured by it
    files = {"grad_norm_total": plot_bands(curves, out_dir / "grad_norm_total.png",
                                           f"{title + ': ' if title else ''}grad_norm/total (before clipping)"
                                           + (", median and min-max over seeds" if any(len(c.runs) > 1 for c in configs)
                                              else ""), "global gradient L2 norm", scores)}
    files["summary_md"], files["summary_csv"] = write_summary_tables(configs, out_dir)
    files["runs_csv"] = write_runs_csv(runs, varied, out_dir / "runs.csv")
    return files, configs


def summarize_sweep(tracker, runs: list, out_dir: Path, writer, keep_figures: bool = True) -> Optional[str]:
    """End of a sweep: the summary of its child ``runs`` (histories read through ``tracker``),
    written to the parent run (``writer``, a run logger) under ``sweep/``, with counts and the best
    score as metrics. Returns its :func:`console_table`. ``keep_figures=False``: the figures' copy in
    ``out_dir`` is removed once logged (``tracking.keep_local_artifacts``; the tables stay there)."""
    if not runs:
        return None
    files, configs = _write_summary(runs, out_dir, tracker.history)
    for path in files.values():
        writer.log_artifact(path, "sweep")
    for path in files.values() if not keep_figures else ():
        if path.suffix == ".png":
            path.unlink(missing_ok=True)
    scores = [r.data.metrics[BEST_DEV_ACC] for r in runs
              if r.info.status == "FINISHED" and math.isfinite(r.data.metrics.get(BEST_DEV_ACC, math.nan))]
    summary = {"sweep/runs": len(runs), "sweep/finished": sum(r.info.status == "FINISHED" for r in runs),
               "sweep/failed": sum(r.info.status == "FAILED" for r in runs)}
    if scores:
        summary[BEST_DEV_ACC] = max(scores)
    writer.log_metrics(0, summary)
    return console_table(configs, files["summary_csv"])


def sweep_summary_hook(header: dict[str, Any], run_id: str, folder: Path, out_dir: str, keep_local: bool = True,
                       **_: Any) -> dict[str, Any]:
    """The delivery hook a sweep's parent journal ends with: once every child is on the store, the
    summary (:func:`summarize_sweep`) goes to the parent run. It runs in whichever process delivers
    the parent (the sweep's delivery process; ``gradsweep sync`` after an outage), so the sweep
    process itself never loads MLflow. Returns what the sweep prints: the table and links."""
    from gradsweep.track.ownership import deliver_children
    from gradsweep.track.tracker import StoreRun, Tracker

    deliver_children(folder, run_id)
    tracker = Tracker(header["uri"], header["experiment_name"], header.get("artifact_location"))
    runs = tracker.children(run_id)
    table = summarize_sweep(tracker, runs, Path(out_dir), StoreRun(tracker.client, run_id), keep_local)
    if runs:  # the parent's page links its children's comparison and charts (landing.parent_note)
        from gradsweep.report.landing import parent_note

        tracker.client.set_tag(run_id, NOTE_TAG, parent_note(tracker.experiment_id, [r.info.run_id for r in runs],
                                                             runs[0].data.tags.get(SWEEP_TAG)))
    return {"experiment_id": tracker.experiment_id, "children": [r.info.run_id for r in runs], "table": table}


# ------------------------------------------------------------------------------ the UI
UI = "http://127.0.0.1:5000"  #: where `mlflow ui` serves by default


def ui_links(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> dict[str, str]:
    """Links into the MLflow UI (3.x) of the store at ``tracking_uri`` (an embedded store: where
    ``mlflow ui`` serves), each in its model-training view (:mod:`gradsweep.report.landing`)."""
    from gradsweep.report.landing import routes
    from gradsweep.track.uri import is_local_sqlite, mask

    base = UI if is_local_sqlite(tracking_uri) else mask(tracking_uri).rstrip("/")
    return {name: f"{base}/{route}" for name, route in routes(experiment_id, run_ids).items()}


def ui_command(uri: str) -> str:
    """An ``mlflow ui`` command that runs as printed, also in a shell without the venv activated."""
    import sys

    exe = Path(sys.executable).with_name("mlflow")
    return f"{exe if exe.is_file() else 'mlflow'} ui --backend-store-uri {uri}"
