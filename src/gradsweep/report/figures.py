"""Figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib
import numpy as np

from gradsweep.labels import shorten
from gradsweep.train.sinks import Series

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LEGEND_WIDTH = 40  # characters per legend line: longer run labels squeezed the axes to nothing


def _legend(ax, **kwargs) -> None:
    """A legend whose long labels (run names with their varied params) are wrapped, not clipped."""
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, [textwrap.fill(label, LEGEND_WIDTH) for label in labels], **kwargs)


def _positive(series: Series) -> Series:
    """Log axes cannot show zeros: drop non-positive and non-finite points."""
    pts = [(s, v) for s, v in zip(*series, strict=True) if v > 0 and v == v and v != float("inf")]
    return [p[0] for p in pts], [p[1] for p in pts]


SMOOTH_POINTS = 200  # a band figure draws at most about this many points per line


def _geometric_mean(values: list[float], window: int) -> list[float]:
    """Non-overlapping windows of ``window`` values -> their geometric mean."""
    if window <= 1:
        return values
    out = []
    for i in range(0, len(values) - window + 1, window):
        chunk = values[i:i + window]
        out.append(math.exp(sum(math.log(v) for v in chunk) / window) if min(chunk) > 0
                   else sum(chunk) / window)
    return out


def plot_bands(curves: dict[str, tuple[list[int], list[float], list[float], list[float]]], path: str | Path,
               title: str, ylabel: str, scores: Optional[dict[str, float]] = None) -> Path:
    """:func:`draw_bands`, saved to ``path``."""
    return _save(draw_bands(curves, title, ylabel, scores), path)


def draw_bands(curves: dict[str, tuple[list[int], list[float], list[float], list[float]]], title: str, ylabel: str,
               scores: Optional[dict[str, float]] = None):
    """Per configuration: the median line and a shaded min-max band (steps, median, low, high).
    More than ``LEGEND_MAX`` configurations: coloured by ``scores`` (the objective), the best few
    bold and named (see :func:`by_objective`), no band for the rest.
    Drawn at the end of every sweep: fixed margins, as :func:`plot_param_norms`."""
    title = textwrap.fill(title, 90)
    fig, ax = plt.subplots(figsize=(9, 5))
    many = len(curves) > LEGEND_MAX
    fig.subplots_adjust(left=0.09, right=0.92 if many else 0.97, bottom=0.11,  # many: room for the colorbar's label
                        top=0.93 - 0.035 * title.count("\n"))
    top = set(best_of(scores or {}, HIGHLIGHT)) if many else set(curves)
    longest = max((len(c[0]) for c in curves.values()), default=0)
    window = longest // SMOOTH_POINTS if longest > 2 * SMOOTH_POINTS else 1  # minibatch noise hides the trend
    lines: dict[str, list[Any]] = {}
    for label, (steps, med, lo, hi) in curves.items():
        pts = [(s, m, a, b) for s, m, a, b in zip(steps, med, lo, hi, strict=True) if a > 0]  # log axis
        if not pts:
            continue
        s, m, a, b = (list(x) for x in zip(*pts, strict=True))
        s = [sum(s[i:i + window]) / window for i in range(0, len(s) - window + 1, window)]
        m, a, b = (_geometric_mean(x, window) for x in (m, a, b))
        line, = ax.plot(s, m, label=label, linewidth=1.4)
        lines[label] = [line]
        if label in top and any(x != y for x, y in zip(a, b, strict=True)):
            lines[label].append(ax.fill_between(s, a, b, color=line.get_color(), alpha=0.18, linewidth=0))
    ax.set_yscale("log")
    ax.set_xlabel("step" + (f" (each point: geometric mean over {window} steps)" if window > 1 else ""))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if many:
        by_objective(ax, lines, scores or {})
    elif curves:
        _legend(ax, fontsize=8)
    return fig


LEGEND_MAX = 8  #: up to this many lines, each has a colour and a legend entry of its own
HIGHLIGHT = 5  #: beyond that, this many best lines are drawn bold and named; the others faint


def best_of(scores: dict[str, float], n: int) -> list[str]:
    """The ``n`` labels with the highest finite score, best first."""
    finite = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    return sorted(finite, key=lambda k: -finite[k])[:n]


def by_objective(ax, lines: dict[str, list], scores: dict[str, float], what: str = "best dev acc") -> None:
    """Many lines made readable at any count: each coloured by its score on one colour scale (a
    colorbar says which), the ``HIGHLIGHT`` best bold and named in a legend inside the axes with
    their rank and score, the others thin and faint (grey when they have no score: pruned, failed).
    The legend never has more than ``HIGHLIGHT + 1`` entries."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    ranked = best_of({k: v for k, v in scores.items() if k in lines}, HIGHLIGHT)
    finite = [scores[k] for k in lines if scores.get(k) is not None and math.isfinite(scores[k])]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    norm, cmap = Normalize(lo, hi if hi > lo else lo + 1e-9), plt.get_cmap("viridis")
    for label, artists in lines.items():
        score = scores.get(label)
        colour = cmap(norm(score)) if score is not None and math.isfinite(score) else "0.6"
        on_top = label in ranked
        for artist in artists:
            artist.set_color(colour)
            artist.set_zorder(3 if on_top else 1)
            artist.set_label("_nolegend_")
            if isinstance(artist, Line2D):
                artist.set_linewidth(2.0 if on_top else 0.8)
                artist.set_alpha(1.0 if on_top else 0.3)
                artist.set_markersize(4 if on_top else 2)
    handles = [lines[k][0] for k in ranked]
    texts = [textwrap.fill(f"{i + 1}. {shorten(k)}: {scores[k]:.3g}", 2 * LEGEND_WIDTH) for i, k in enumerate(ranked)]
    rest = len(lines) - len(ranked)
    if rest:
        handles.append(Line2D([], [], color="0.6", linewidth=0.8, alpha=0.6))
        texts.append(f"{rest} others (faint)")
    ax.legend(handles, texts, fontsize=7, loc="best", framealpha=0.85, title=f"best {len(ranked)} by {what}",
              title_fontsize=7)
    if finite:
        ax.figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label=what, pad=0.01, fraction=0.04)


def plot_param_norms(history: dict[str, Series], path: str | Path, title: str = "") -> Path:
    """Per-parameter gradient L2 norms vs step, and the total before (thick) and after clipping
    (dashed, drawn only when the clipper changed something, under the total so it never hides it);
    legend beside the axes, not over the data. Drawn for every run: fixed margins instead of
    constrained layout, the costliest step of drawing it."""
    fig, ax = plt.subplots(figsize=(10, 5))
    fig.subplots_adjust(left=0.08, right=0.76, top=0.92, bottom=0.1)
    history = {k: _peaks(v) for k, v in history.items() if k.startswith("grad_norm/")}
    for key, series in history.items():
        name = key.removeprefix("grad_norm/")
        if name in ("total", "total_clipped"):
            continue
        ax.plot(*_positive(series), label=name, linewidth=1.0, alpha=0.85)
    if "grad_norm/total" in history:
        ax.plot(*_positive(history["grad_norm/total"]), label="total (before clipping)", color="black", linewidth=2.0,
                zorder=3)
    clipped = history.get("grad_norm/total_clipped")
    if clipped is not None and "grad_norm/total" in history and \
            not np.array_equal(clipped[1], history["grad_norm/total"][1]):
        ax.plot(*_positive(clipped), label="total after clipping", color="black", linestyle="--", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(title or "gradient norms")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


PLOT_POINTS = 2000  #: a line holds at most about this many points (a figure is ~1000 pixels wide)


def _peaks(series: Series) -> Series:
    """A long series cut to about PLOT_POINTS windows, each drawn as its largest value at its step
    (on a log axis of norms, spikes are what must stay visible)."""
    steps, values = np.asarray(series[0]), np.asarray(series[1], dtype=float)
    if len(steps) <= PLOT_POINTS:
        return steps, values
    w = -(-len(steps) // PLOT_POINTS)
    padded = np.full(-(-len(values) // w) * w, -np.inf)
    padded[:len(values)] = np.where(np.isfinite(values), values, -np.inf)
    rows = padded.reshape(-1, w).argmax(axis=1) + np.arange(0, len(padded), w)
    return steps[rows], values[rows]


def run_figure_hook(header: dict, run_id: str, folder: Path, path: str, title: str = "", keep_local: bool = True,
                    **_) -> dict:
    """The delivery hook a job's journal ends with: :func:`plot_param_norms` of the run's
    ``grad_norm/*`` values as its journal holds them, saved to ``path`` (the job's output folder;
    a temporary one where that cannot be written, e.g. ``gradsweep sync`` on another machine) and
    logged to the run as ``figures/grad_norms.png``. Drawn where the journal is delivered, so the
    training process never loads matplotlib. ``keep_local=False`` (``tracking.keep_local_artifacts``):
    the store's copy is the only one (drawn in a temporary folder, ``path`` is not written)."""
    import tempfile

    from gradsweep.track.delivery import client_for
    from gradsweep.track.steps import StepSchema, read_records
    from gradsweep.track.tracker import StoreRun
    from gradsweep.train.sinks import HistorySink

    sink = HistorySink()  # what the job's own HistorySink held, read back from its journal's step records
    schema = StepSchema.load(folder)
    client = client_for(header["uri"])
    if schema is not None:
        recs = read_records(folder, schema, 0)
        sink.define_steps(schema.names, schema.total_steps)
        if header.get("run_id"):  # a run continued in place: its steps before this journal, from the store
            _earlier_steps(sink, client, run_id, schema.names, int(recs["step"][0]) if len(recs) else None)
        sink.log_steps(recs["step"], recs["v"])
    if not sink.history:
        return {"drawn": False}
    with tempfile.TemporaryDirectory(prefix="gradsweep-figure-") as tmp:
        out = None
        if keep_local:
            try:
                out = plot_param_norms(sink.history, path, title=title)
            except OSError:
                pass
        if out is None:  # the store's copy is the only one, or the job's folder cannot be written
            out = plot_param_norms(sink.history, Path(tmp) / "grad_norms.png", title=title)
        StoreRun(client, run_id).log_artifact(out, "figures")
    return {"drawn": True, "path": str(out)}


def _earlier_steps(sink, client, run_id: str, names: list[str], before: Optional[int]) -> None:
    """The run's dense history on the store before step ``before`` (a resumed run's earlier
    journals), into ``sink``: the figure covers the whole run, as the verdict does."""
    from gradsweep.track.history import read_history

    try:
        dense = read_history(client, run_id)
    except Exception:  # the figure still shows this journal's steps
        return
    if dense is None or list(dense.columns) != names:
        return
    if before is not None:
        dense = dense[dense.index < before]
    sink.log_steps(dense.index.to_numpy(dtype=np.int64), dense.to_numpy(dtype=np.float32))


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # zlib level 1: a third of the figure's time went to PNG compression at the default level 6;
    # line plots are ~10% larger for it
    fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def plot_layer_bars(panels: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str,
                    ylabel: str = "gradient L2 norm") -> Path:
    """Grouped bars, log scale: one panel per key of ``panels`` (e.g. "first 10 steps"), each
    ``{run label: {layer: value}}``; layers on the x axis, one bar per run."""
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), constrained_layout=True, squeeze=False)
    for ax, (panel, runs) in zip(axes[0], panels.items(), strict=True):
        layers = list(dict.fromkeys(layer for values in runs.values() for layer in values))
        width = 0.8 / max(len(runs), 1)
        for i, (label, values) in enumerate(runs.items()):
            ys = [values.get(layer, float("nan")) for layer in layers]
            ys = [y if y == y and y > 0 else float("nan") for y in ys]  # zeros cannot be drawn on a log axis
            ax.bar(np.arange(len(layers)) + (i - (len(runs) - 1) / 2) * width, ys, width, label=label)
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), [layer.removesuffix(".weight") for layer in layers], rotation=30)
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if runs:
            _legend(ax, fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_metric_vs_value(points: dict[str, list[tuple[Any, ...]]], path: str | Path, title: str,
                         xlabel: str, ylabel: str = "accuracy") -> Path:
    """Final metrics against a swept value: ``{series label: [(x, test_acc, best_dev_acc[, test_min,
    test_max])]}``. Numeric x values are placed on a (log, when they span >= 100x) numeric axis, others
    as categories. Filled markers: test accuracy (medians over seeds, with a min-max bar when given);
    hollow: best dev accuracy."""
    xs_all = [p[0] for pts in points.values() for p in pts]
    numeric = all(isinstance(x, (int, float)) for x in xs_all)
    cats = list(dict.fromkeys(str(x) for x in xs_all))
    fig, ax = plt.subplots(figsize=(8, 4.8), constrained_layout=True)
    for label, pts in points.items():
        pts = sorted(pts, key=lambda p: p[0] if numeric else cats.index(str(p[0])))
        xs = [p[0] if numeric else cats.index(str(p[0])) for p in pts]
        line, = ax.plot(xs, [p[1] for p in pts], "o-", label=f"{label} test" if label else "test")
        if any(len(p) == 5 and p[3] != p[4] for p in pts):
            ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[3] for p in pts], [p[4] - p[1] for p in pts]],
                        fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.8)
        ax.plot(xs, [p[2] for p in pts], "o--", mfc="none", color=line.get_color(), alpha=0.7,
                label=f"{label} best dev" if label else "best dev")
    if numeric and xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(cats)), [textwrap.fill(c, LEGEND_WIDTH // 2) for c in cats], rotation=20)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7, ncol=2 if len(points) > 3 else 1)
    return _save(fig, path)


def plot_epoch_stats(runs: Mapping[str, Mapping[str, Mapping[str, Series]]], path: str | Path, title: str) -> Path:
    """Per-epoch weight and gradient mean/std: one row per run, one column per statistic
    (``{run label: {stat: {layer: (epochs, values)}}}``), one line per layer."""
    stats = ["weight_mean", "weight_std", "grad_mean", "grad_std"]
    fig, axes = plt.subplots(len(runs), 4, figsize=(16, 2.8 * len(runs) + 0.6), constrained_layout=True,
                             squeeze=False)
    for row, (label, by_stat) in zip(axes, runs.items(), strict=True):
        for ax, stat in zip(row, stats, strict=True):
            for layer, (xs, ys) in by_stat.get(stat, {}).items():
                ax.plot(xs, ys, label=layer.removesuffix(".weight"), linewidth=1.1)
            if stat == "grad_std":
                ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_title(f"{label}: {stat}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        _legend(row[0], fontsize=7)
    fig.suptitle(title)
    return _save(fig, path, dpi=80)
