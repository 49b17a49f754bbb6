"""Clipping rules compared on learning-rate ladders, read from the store (``gradsweep studies
--only adaptive_clipping``): per model and rule, the largest learning rate at which every seed trains
without diverging, the best dev accuracy at the rule's best learning rate and how often it clipped
(:func:`comparison_rows`), and the figures of it (:func:`comparison_figures`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

RULE_ORDER = ("none", "norm", "autoclip", "agc", "zclip", "adagc")


@dataclass
class ClipRun:
    """What the comparison needs of one run."""

    model: str
    rule: str  # clip.name, or "norm <max_norm>"
    lr: float
    seed: int
    status: str
    failure: str
    best_dev: float
    loss_first: float
    loss_end: float  # median of the last 10 finite training losses
    clipped: float  # fraction of steps with clip/coef < 1

    @property
    def diverged(self) -> bool:
        """Stopped on a non-finite value, or its training loss ended no lower than at its first step."""
        return self.status != "FINISHED" or not self.loss_end < self.loss_first


def clip_runs(name: str, store: str) -> list[ClipRun]:
    from gradsweep.names import BEST_DEV_ACC, CLIP_COEF, FAILURE_TAG, TRAIN_LOSS
    from gradsweep.report.build import history
    from gradsweep.track.delivery import mlflow_client

    client = mlflow_client(store)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10000, order_by=["attributes.start_time DESC"]) \
        if exp else []
    out, seen = [], set()
    for r in runs:
        p = r.data.params
        if "optimizer.lr" not in p or r.info.status not in ("FINISHED", "FAILED"):  # sweep parents; interrupted runs
            continue
        cell = (p["model.name"], p["clip.name"], p.get("clip.max_norm"), p["optimizer.lr"], p["trainer.seed"])
        if cell in seen:  # run again after an interruption: the latest counts
            continue
        seen.add(cell)
        rule = p["clip.name"] + (f" {float(p['clip.max_norm']):g}" if p["clip.name"] == "norm" else "")
        loss = history(client, r.info.run_id, TRAIN_LOSS)[1]
        finite = [v for v in loss if math.isfinite(v)]
        coef = history(client, r.info.run_id, CLIP_COEF)[1]
        out.append(ClipRun(p["model.name"], rule, float(p["optimizer.lr"]), int(p["trainer.seed"]), r.info.status,
                           r.data.tags.get(FAILURE_TAG, ""), r.data.metrics.get(BEST_DEV_ACC, math.nan),
                           loss[0] if loss else math.nan,
                           statistics.median(finite[-10:]) if finite else math.nan,
                           sum(c < 1 for c in coef) / len(coef) if coef else math.nan))
    return out


def spread(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def rule_key(rule: str) -> tuple:
    base, _, thr = rule.partition(" ")
    return (RULE_ORDER.index(base) if base in RULE_ORDER else len(RULE_ORDER), float(thr or 0))


def comparison_rows(runs: list[ClipRun], preset_threshold: float) -> tuple[list[str], dict]:
    """Markdown rows of one model's table and, per rule, what the figure draws."""
    by_rule: dict[str, dict[float, list[ClipRun]]] = {}
    for r in runs:
        by_rule.setdefault(r.rule, {}).setdefault(r.lr, []).append(r)
    rows, curves = [], {}
    for rule in sorted(by_rule, key=rule_key):
        ladder = by_rule[rule]
        lrs = sorted(ladder)
        stable = [lr for lr in lrs if not any(r.diverged for r in ladder[lr])]
        best = max(stable, key=lambda lr: (statistics.median(r.best_dev for r in ladder[lr]),
                                           -statistics.median(r.loss_end / r.loss_first for r in ladder[lr])),
                   default=None)
        runs_all = [r for lr in lrs for r in ladder[lr]]
        nonfinite = sum(r.status != "FINISHED" for r in runs_all)
        largest = "none" if not stable else f"{max(stable):g}" + (" (top)" if max(stable) == lrs[-1] else "")
        label = rule if not rule.startswith("norm") else \
            f"norm {rule.split()[1]}" + (" (tuned)" if float(rule.split()[1]) == preset_threshold else "")
        if best is None:
            cells = ["-", "-", "-", "-"]
        else:
            b = ladder[best]
            cells = [f"{best:g}", spread([r.best_dev for r in b]),
                     f"{statistics.median(r.loss_end / r.loss_first for r in b):.2f}",
                     f"{statistics.median(r.clipped for r in b):.0%}"]
        rows.append(f"| {label} | {largest} | " + " | ".join(cells) +
                    f" | {sum(r.diverged for r in runs_all)}/{len(runs_all)} ({nonfinite} non-finite) |")
        curves[label] = (lrs,
                         [statistics.median([r.best_dev for r in ladder[lr] if r.status == "FINISHED"] or [math.nan])
                               for lr in lrs],
                         [sum(r.diverged for r in ladder[lr]) / len(ladder[lr]) for lr in lrs])
    return rows, curves


def comparison_figures(name: str, panels: dict, runs: list[ClipRun], tuned: dict[str, float], store: str,
                        out: Path) -> list[Path]:
    """``<name>_lr.png``: per model, median best dev accuracy and the fraction of seeds that diverged
    against the learning rate, one line per rule; ``<name>_thresholds.png``: what each rule did at
    every step of one run (the deepest model, seed 0, the lowest lr where the unclipped run diverged)."""
    from gradsweep.report.figures import plt

    out.mkdir(parents=True, exist_ok=True)
    # one colour per rule in every panel
    colors = {rule: plt.get_cmap("tab10")(i) for i, rule in enumerate(RULE_ORDER)}
    fig, axes = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 7.5), squeeze=False, constrained_layout=True)
    for col, (preset, curves) in enumerate(panels.items()):
        untuned_seen = 0
        for label, (lrs, dev, div) in curves.items():
            rule = label.split()[0]
            untuned = rule == "norm" and "(tuned)" not in label  # the tuning sweep: thin, dashed, faint
            style = {"color": colors.get(rule), "linestyle": (0, (2 + 2 * untuned_seen, 2)) if untuned else "-",
                     "linewidth": 1.0 if untuned else 1.8, "marker": "o", "markersize": 3,
                     "alpha": 0.45 if untuned else 1.0}
            untuned_seen += untuned
            # the divergence curves of several rules coincide: a small offset keeps each visible
            shift = 0.012 * (list(curves).index(label) - len(curves) / 2)
            axes[0][col].plot(lrs, dev, label=label, **style)
            axes[1][col].plot(lrs, [d + shift for d in div], **style)
        for ax, title, ylabel in ((axes[0][col], "best dev accuracy (median over seeds)", "best dev acc"),
                                  (axes[1][col], "fraction of seeds that diverged", "fraction of seeds")):
            ax.set(xscale="log", title=f"{preset}: {title}", xlabel="lr", ylabel=ylabel)
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=8)
            ax.minorticks_off()
        axes[1][col].set_ylim(-0.1, 1.1)
        axes[0][col].legend(fontsize=8)
    paths = [out / f"{name}_lr.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    path = threshold_figure(name, runs, tuned, store, out)
    if path is not None:
        paths.append(path)
    return paths


def threshold_figure(name: str, runs: list[ClipRun], tuned: dict[str, float], store: str, out: Path) -> Path | None:
    from gradsweep.names import CLIP_THRESHOLD, GRAD_TOTAL, GRAD_TOTAL_CLIPPED
    from gradsweep.report.build import history
    from gradsweep.report.figures import plt
    from gradsweep.track.delivery import mlflow_client

    model = list(tuned)[-1]  # the last preset: the deeper model
    failed = sorted(r.lr for r in runs if r.model == model and r.rule == "none" and r.diverged)
    if not failed:
        return None
    lr = failed[0]
    client = mlflow_client(store)
    exp = client.get_experiment_by_name(name)
    chosen: dict[str, str] = {}
    for r in client.search_runs([exp.experiment_id], max_results=5000):
        p = r.data.params
        if p.get("model.name") != model or p.get("trainer.seed") != "0" or float(p.get("optimizer.lr", "nan")) != lr:
            continue
        if p["clip.name"] != "norm" or float(p["clip.max_norm"]) == tuned[model]:
            chosen.setdefault(p["clip.name"], r.info.run_id)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True, constrained_layout=True)
    for ax, rule in zip(axes.flat, RULE_ORDER, strict=True):
        ax.set(yscale="log", title=f"clip={rule}" + (f" (max_norm {tuned[model]:g})" if rule == "norm" else ""),
               xlabel="step")
        if rule not in chosen:
            continue
        for key, style in ((GRAD_TOTAL, {"linewidth": 1.6, "label": "grad_norm/total (before)"}),
                           (GRAD_TOTAL_CLIPPED, {"linewidth": 1.0, "linestyle": "--",
                                                 "label": "grad_norm/total_clipped"}),
                           (CLIP_THRESHOLD, {"linewidth": 1.0, "color": "k", "label": "clip/threshold"})):
            steps, values = history(client, chosen[rule], key)
            pts = [(st, v) for st, v in zip(steps, values, strict=True) if math.isfinite(v) and v > 0]
            if pts:
                ax.plot(*zip(*pts, strict=True), **style)
        ax.legend(fontsize=7)
    fig.suptitle(f"{name}: {model}, lr {lr:g} (the lowest lr where unclipped runs diverged), seed 0")
    path = out / f"{name}_thresholds.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Preset:
    """One preset of a comparison: its model, and the fixed threshold (``clip.max_norm``) it tunes."""

    name: str
    model: str
    max_norm: float


#: what the comparison's tables say, below them
NOTES = ("A run *diverged* when it stopped on a non-finite loss or gradient (FAILED, `failure=nonfinite_*`) or "
         "its training loss (median of the last 10 steps) ended no lower than at its first step. Best lr: the "
         "stable lr with the highest median best dev accuracy (ties: the lower training loss). Values are "
         "`median [min-max]` over the seeds; steps clipped: the fraction of steps with `clip/coef` < 1 "
         "(median over the seeds); `(tuned)`: the preset's fixed threshold, chosen by the rows of the other "
         "thresholds (the tuning sweep).")


def comparison_tables(runs: list[ClipRun], presets: list[Preset]) -> tuple[list[str], dict, dict[str, float]]:
    """Markdown lines of one table per preset; per preset what :func:`comparison_figures` draws; per
    model its tuned threshold."""
    lines: list[str] = []
    panels, tuned = {}, {}
    for preset in presets:
        mine = [r for r in runs if r.model == preset.model]
        rows, curves = comparison_rows(mine, preset.max_norm)
        seeds = len({r.seed for r in mine})
        lrs = sorted({r.lr for r in mine})
        lines += [f"**`{preset.name}`** ({preset.model}; lr {lrs[0]:g} to {lrs[-1]:g} in x2 steps; {seeds} seeds "
                  "per cell)", "",
                  "| rule | largest lr, every seed stable | best lr | best dev acc at best lr | "
                  "train loss end/start at best lr | steps clipped at best lr | diverged runs |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
        panels[preset.name] = curves
        tuned[preset.model] = preset.max_norm
    return lines, panels, tuned
