"""``gradsweep studies``: re-run the seven studies over seeds and regenerate docs/studies.md's numbers.

For each study: ``python src/train.py -m experiment=<study> trainer.seed=range(0,N)`` on a fresh
embedded store, then its report (figures and the per-configuration summary, ``median [min-max]``
over the seeds). In docs/studies.md, what stands between ``<!-- gradsweep studies: <name> -->`` and
``<!-- end <name> -->`` is replaced by the generated table, and ``<!-- gradsweep studies:
calibration -->`` by the table of expected against given verdicts (synthetic cases and every study
variant, every miss listed). Prose outside the markers is left as it is. Figures are copied to
``docs/figures/<study>_<figure>.png``.

A comparison (``--only adaptive_clipping``; not part of the default seven) runs several presets and a
tuning sweep of the fixed threshold, and writes a table of its own: per model and clipping rule, the
largest learning rate at which every seed trains without diverging, the best dev accuracy at the
rule's best learning rate and how often the rule clipped (:func:`_comparison`).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from gradsweep.paths import ROOT, TRAIN

FIGURES = ("grad_norm_total", "layer_grad_norms", "final_accuracy", "epoch_stats")


@dataclass(frozen=True)
class Comparison:
    """Clipping rules compared on learning-rate ladders: ``presets`` each sweep the rules x the ladder;
    ``thresholds`` per preset: other values of clip.max_norm run with clip=norm on the same ladder (the
    tuning sweep behind the preset's own threshold, shown beside it)."""

    presets: tuple[str, ...]
    thresholds: dict[str, str] = field(default_factory=dict)


COMPARISONS = {
    "adaptive_clipping": Comparison(("adaptive_clipping", "adaptive_clipping_mlp"),
                                    {"adaptive_clipping": "1,10,20", "adaptive_clipping_mlp": "30,100"}),
}
RULE_ORDER = ("none", "norm", "autoclip", "agc", "zclip", "adagc")
#: studies of the examples/ package (a user's own code, on PYTHONPATH as a user has it): the preset and
#: the script that prints its table from the store (it reads each run's dense history)
EXAMPLE_STUDIES = {"lm_spikes": "examples/lm_spikes_table.py"}
#: presets that demonstrate, not study: nothing of the literature to compare with (tests/test_studies.py checks them)
DEMOS = ("clip_rescue",)


def classic_studies() -> list[str]:
    """The studies ``gradsweep studies`` runs by default: every preset that is not part of a comparison."""
    from gradsweep.report.build import study_names

    inside = {p for c in COMPARISONS.values() for p in c.presets}
    return [n for n in study_names() if n not in inside and n not in DEMOS]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=5, help="seeds per variant: trainer.seed=range(0,N) (default 5)")
    p.add_argument("--only", action="append", help="only this study (repeatable; default: the seven classic ones; "
                                                   f"also: {', '.join(COMPARISONS)})")
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel (Hydra's joblib launcher; default 2)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "studies.md", help="the document to update")
    p.add_argument("--workdir", type=Path, help="where the runs and the store go (default: a new temp dir); "
                                                "studies it already ran are reported again, not re-run")
    p.add_argument("--no-docs", action="store_true", help="run and report only; leave the docs as they are")


def run(args: argparse.Namespace) -> int:
    from gradsweep.errors import ConfigError

    allowed = classic_studies() + list(COMPARISONS) + list(EXAMPLE_STUDIES)
    names = args.only or classic_studies()
    unknown = sorted(set(names) - set(allowed))
    if unknown or args.seeds < 1 or args.jobs < 1:
        raise ConfigError(f"--only={','.join(unknown)} / --seeds={args.seeds} / --jobs={args.jobs} is invalid; "
                          f"allowed: studies {'|'.join(allowed)}, seeds >= 1, jobs >= 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gradsweep-studies-"))
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work.resolve() / 'mlruns' / 'mlflow.db'}"
    print(f"{len(names)} studies x {args.seeds} seeds in {work} ({args.jobs} jobs at a time)", flush=True)
    blocks: dict[str, str] = {}
    calibration: list[list[str]] = []
    for name in names:
        if name in COMPARISONS:
            seconds = 0.0
            for preset, extra in _comparison_sweeps(name):
                took = _sweep(preset, extra, store, work, args, lean=True)
                if took is None:
                    return 1
                seconds += took
            blocks[name] = _comparison(name, store, work, args, seconds)
            print(f"{name}: {seconds:.0f} s", flush=True)
            continue
        if name in EXAMPLE_STUDIES:
            took = _sweep(name, [], store, work, args, env=_examples_env())
            if took is None:
                return 1
            seconds = took
            blocks[name] = _example_block(name, store, work, args, seconds)
            print(f"{name}: {seconds:.0f} s", flush=True)
            continue
        took = _sweep(name, [], store, work, args)
        if took is None:
            return 1
        seconds = took
        block, rows = _study(name, store, work, args, seconds)
        blocks[name] = block
        calibration += rows
        print(f"{name}: {seconds:.0f} s", flush=True)
    if not args.no_docs:
        if any(n not in COMPARISONS and n not in EXAMPLE_STUDIES for n in names):  # no verdict labels to calibrate
            blocks["calibration"] = _calibration_block(calibration)
        _update(args.docs, blocks)
        print(f"updated {args.docs} ({', '.join(blocks)})")
    return 0


def _examples_env() -> dict[str, str]:
    import os

    path = os.pathsep.join(p for p in (str(ROOT / "examples"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _example_block(name: str, store: str, work: Path, args: argparse.Namespace, seconds: float) -> str:
    """The table an examples/ study's own script prints from the store."""
    figure = args.docs.parent / "figures" / f"{name}.png"
    cmd = [sys.executable, str(ROOT / EXAMPLE_STUDIES[name]), "--tracking-uri", store]
    cmd += [] if args.no_docs else ["--figure", str(figure)]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_examples_env(), check=True).stdout
    return (f"Generated by `gradsweep studies --only {name} --seeds {args.seeds}` on {date.today().isoformat()} "
            f"in {seconds:.0f} s (2-core machine, {args.jobs} jobs at a time), tables and figure "
            f"([{name}](figures/{name}.png)) by `{EXAMPLE_STUDIES[name]}`: " + out.strip())


def _sweep(preset: str, extra: list[str], store: str, work: Path, args: argparse.Namespace,
           lean: bool = False, env: dict[str, str] | None = None) -> float | None:
    """``train.py -m experiment=<preset> <extra> trainer.seed=range(0,N)`` once per --workdir; its seconds.
    ``lean``: no per-run figure and no checkpoint artifacts (a comparison reads metrics only)."""
    tag = preset + "".join(f"__{e.replace('=', '-').replace(',', '_')}" for e in extra)
    t0 = time.monotonic()
    cmd = [sys.executable, str(TRAIN), "-m", f"experiment={preset}", *extra, f"trainer.seed=range(0,{args.seeds})",
           f"tracking.uri={store}", f"hydra.sweep.dir={work / 'multirun' / tag}"]
    if lean:
        cmd += ["tracking.log_figures=false", "tracking.log_checkpoints=false"]
    if args.jobs > 1:
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
    log, done = work / f"{tag}.log", work / f"{tag}.done"
    if done.is_file():  # an earlier invocation on this --workdir ran it: report it again only
        return float(done.read_text())
    with log.open("w") as out:
        rc = subprocess.call(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        print(f"error: study {preset} failed (exit {rc}); see {log}", file=sys.stderr)
        return None
    seconds = time.monotonic() - t0
    done.write_text(f"{seconds:.1f}")
    return seconds


def _study(name: str, store: str, work: Path, args: argparse.Namespace, seconds: float) -> tuple[str, list[list[str]]]:
    from gradsweep.report.build import make_report, resolve
    from gradsweep.report.expectations import expected_for
    from gradsweep.report.summary import group_runs

    rep = make_report(name, store, str(work / "reports" / name))
    from gradsweep.track.delivery import mlflow_client

    runs = resolve(mlflow_client(store), name, store).runs
    shown = [fig for fig in FIGURES if fig in rep.files]
    if not args.no_docs:  # refresh the figures the document shows (the others stay in the report)
        text = args.docs.read_text()
        shown = [fig for fig in shown if f"figures/{name}_{fig}.png" in text]
        for fig in shown:
            shutil.copyfile(rep.files[fig], args.docs.parent / "figures" / f"{name}_{fig}.png")
    table = rep.files["summary_md"].read_text().strip()
    block = (f"Generated by `gradsweep studies --seeds {args.seeds}` on {date.today().isoformat()}: {len(runs)} runs "
             f"in {seconds:.0f} s (2-core machine, {args.jobs} jobs at a time). Figures: "
             + (", ".join(f"[{fig}](figures/{name}_{fig}.png)" for fig in shown) or "in the report")
             + ".\n\n" + table)
    rows = []
    for config in group_runs(runs):
        tags, why = expected_for(name, config.runs[0].data.params)
        given = Counter(r.data.tags.get("grad_health", "-") for r in config.runs)
        misses = 0 if tags is None else sum(c for t, c in given.items() if t not in tags)
        rows.append([f"`{name}` {config.label}", " or ".join(sorted(tags)) if tags else "(no claim)",
                     ", ".join(f"{t} {c}/{len(config.runs)}" for t, c in sorted(given.items())), str(misses), why])
    return block, rows


def _calibration_block(study_rows: list[list[str]]) -> str:
    from gradsweep.train.diagnostics import diagnose
    from gradsweep.train.diagnostics_cases import cases

    lines = ["Synthetic histories (`gradsweep.train.diagnostics_cases`, 10 draws of minibatch noise each):", "",
             "| case | expected | given (10 draws) | misses |", "|---|---|---|---|"]
    total_misses = 0
    for i, case in enumerate(cases()):
        given = Counter(diagnose(c.history).tag for c in (cases(seed=s)[i] for s in range(10)))
        misses = sum(n for t, n in given.items() if t != case.expected)
        total_misses += misses
        lines.append(f"| {case.name}: {case.description} | {case.expected} | "
                     f"{', '.join(f'{t} {n}/10' for t, n in sorted(given.items()))} | {misses} |")
    lines += ["", "Every study variant over its seeds:", "",
              "| variant | expected | given | misses | why |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in study_rows]
    study_misses = sum(int(r[3]) for r in study_rows)
    lines += ["", f"Misses: {total_misses} of the synthetic draws, {study_misses} of the study runs."]
    return "\n".join(lines)


def _update(doc: Path, blocks: dict[str, str]) -> None:
    text = doc.read_text()
    for name, block in blocks.items():
        pattern = re.compile(rf"(<!-- gradsweep studies: {re.escape(name)} -->\n).*?(<!-- end {re.escape(name)} -->)",
                             re.S)
        if not pattern.search(text):
            raise SystemExit(f"error: {doc} has no <!-- gradsweep studies: {name} --> ... <!-- end {name} --> block")
        def fill(m: re.Match[str], block: str = block) -> str:
            return m.group(1) + block + "\n" + m.group(2)

        text = pattern.sub(fill, text)
    doc.write_text(text)


# ------------------------------------------------------------------------------ comparison
def _comparison_sweeps(name: str) -> list[tuple[str, list[str]]]:
    """(preset, extra overrides) of every sweep of a comparison, in its own MLflow experiment."""
    comp = COMPARISONS[name]
    exp = [f"tracking.experiment_name={name}"]
    out = []
    for preset in comp.presets:
        out.append((preset, exp))
        if comp.thresholds.get(preset):
            out.append((preset, [*exp, "clip=norm", f"clip.max_norm={comp.thresholds[preset]}"]))
    return out


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


def _clip_runs(name: str, store: str) -> list[ClipRun]:
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


def _spread(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _rule_key(rule: str) -> tuple:
    base, _, thr = rule.partition(" ")
    return (RULE_ORDER.index(base) if base in RULE_ORDER else len(RULE_ORDER), float(thr or 0))


def _comparison_rows(runs: list[ClipRun], preset_threshold: float) -> tuple[list[str], dict]:
    """Markdown rows of one model's table and, per rule, what the figure draws."""
    by_rule: dict[str, dict[float, list[ClipRun]]] = {}
    for r in runs:
        by_rule.setdefault(r.rule, {}).setdefault(r.lr, []).append(r)
    rows, curves = [], {}
    for rule in sorted(by_rule, key=_rule_key):
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
            cells = [f"{best:g}", _spread([r.best_dev for r in b]),
                     f"{statistics.median(r.loss_end / r.loss_first for r in b):.2f}",
                     f"{statistics.median(r.clipped for r in b):.0%}"]
        rows.append(f"| {label} | {largest} | " + " | ".join(cells) +
                    f" | {sum(r.diverged for r in runs_all)}/{len(runs_all)} ({nonfinite} non-finite) |")
        curves[label] = (lrs,
                         [statistics.median([r.best_dev for r in ladder[lr] if r.status == "FINISHED"] or [math.nan])
                               for lr in lrs],
                         [sum(r.diverged for r in ladder[lr]) / len(ladder[lr]) for lr in lrs])
    return rows, curves


def _comparison(name: str, store: str, work: Path, args: argparse.Namespace, seconds: float) -> str:
    from gradsweep.paths import CONF_DIR
    from gradsweep.sweep.hydra_adapter import compose_config

    runs = _clip_runs(name, store)
    comp = COMPARISONS[name]
    lines, panels, tuned = [], {}, {}
    for preset in comp.presets:
        cfg = compose_config(CONF_DIR, [f"experiment={preset}"])
        model = cfg.model.name
        mine = [r for r in runs if r.model == model]
        rows, curves = _comparison_rows(mine, float(cfg.clip.max_norm))
        seeds = len({r.seed for r in mine})
        lrs = sorted({r.lr for r in mine})
        lines += [f"**`{preset}`** ({model}; lr {lrs[0]:g} to {lrs[-1]:g} in x2 steps; {seeds} seeds per cell)", "",
                  "| rule | largest lr, every seed stable | best lr | best dev acc at best lr | "
                  "train loss end/start at best lr | steps clipped at best lr | diverged runs |",
                  "|---|---|---|---|---|---|---|", *rows, ""]
        panels[preset] = curves
        tuned[model] = float(cfg.clip.max_norm)
    figures = _comparison_figures(name, panels, runs, tuned, store, work / "reports" / name)
    if not args.no_docs:
        for fig in figures:
            shutil.copyfile(fig, args.docs.parent / "figures" / fig.name)
    head = (f"Generated by `gradsweep studies --only {name} --seeds {args.seeds}` on {date.today().isoformat()}: "
            f"{len(runs)} runs in {seconds:.0f} s (2-core machine, {args.jobs} jobs at a time). Figures: "
            + ", ".join(f"[{f.stem}](figures/{f.name})" for f in figures) + ".")
    notes = ("A run *diverged* when it stopped on a non-finite loss or gradient (FAILED, `failure=nonfinite_*`) or "
             "its training loss (median of the last 10 steps) ended no lower than at its first step. Best lr: the "
             "stable lr with the highest median best dev accuracy (ties: the lower training loss). Values are "
             "`median [min-max]` over the seeds; steps clipped: the fraction of steps with `clip/coef` < 1 "
             "(median over the seeds); `(tuned)`: the preset's fixed threshold, chosen by the rows of the other "
             "thresholds (the tuning sweep).")
    return "\n".join([head, "", *lines, notes])


def _comparison_figures(name: str, panels: dict, runs: list[ClipRun], tuned: dict[str, float], store: str,
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
    path = _threshold_figure(name, runs, tuned, store, out)
    if path is not None:
        paths.append(path)
    return paths


def _threshold_figure(name: str, runs: list[ClipRun], tuned: dict[str, float], store: str, out: Path) -> Path | None:
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
