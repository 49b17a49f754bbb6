"""``gradsweep studies``: re-run the seven studies over seeds and regenerate docs/studies.md's numbers.

For each study: ``python src/train.py -m experiment=<study> trainer.seed=range(0,N)`` on a fresh
embedded store, then its report (figures and the per-configuration summary, ``median [min-max]``
over the seeds). In docs/studies.md, what stands between ``<!-- gradsweep studies: <name> -->`` and
``<!-- end <name> -->`` is replaced by the generated table, and ``<!-- gradsweep studies:
calibration -->`` by the table of expected against given verdicts (synthetic cases and every study
variant, every miss listed). Prose outside the markers is left as it is. Figures are copied to
``docs/figures/<study>_<figure>.png``.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

from gradsweep.paths import ROOT, TRAIN

FIGURES = ("grad_norm_total", "layer_grad_norms", "final_accuracy", "epoch_stats")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=5, help="seeds per variant: trainer.seed=range(0,N) (default 5)")
    p.add_argument("--only", action="append", help="only this study (repeatable; default: all seven)")
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel (Hydra's joblib launcher; default 2)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "studies.md", help="the document to update")
    p.add_argument("--workdir", type=Path, help="where the runs and the store go (default: a new temp dir); "
                                                "studies it already ran are reported again, not re-run")
    p.add_argument("--no-docs", action="store_true", help="run and report only; leave the docs as they are")


def run(args: argparse.Namespace) -> int:
    from gradsweep.errors import ConfigError
    from gradsweep.report.build import study_names

    names = args.only or study_names()
    unknown = sorted(set(names) - set(study_names()))
    if unknown or args.seeds < 1 or args.jobs < 1:
        raise ConfigError(f"--only={','.join(unknown)} / --seeds={args.seeds} / --jobs={args.jobs} is invalid; "
                          f"allowed: studies {'|'.join(study_names())}, seeds >= 1, jobs >= 1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gradsweep-studies-"))
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work.resolve() / 'mlruns' / 'mlflow.db'}"
    print(f"{len(names)} studies x {args.seeds} seeds in {work} ({args.jobs} jobs at a time)", flush=True)
    blocks: dict[str, str] = {}
    calibration: list[list[str]] = []
    for name in names:
        t0 = time.monotonic()
        cmd = [sys.executable, str(TRAIN), "-m", f"experiment={name}", f"trainer.seed=range(0,{args.seeds})",
               f"tracking.uri={store}", f"hydra.sweep.dir={work / 'multirun' / name}"]
        if args.jobs > 1:
            cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
        log, done = work / f"{name}.log", work / f"{name}.done"
        if done.is_file():  # an earlier invocation on this --workdir ran it: report it again only
            seconds = float(done.read_text())
        else:
            with log.open("w") as out:
                rc = subprocess.call(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
            if rc != 0:
                print(f"error: study {name} failed (exit {rc}); see {log}", file=sys.stderr)
                return 1
            seconds = time.monotonic() - t0
            done.write_text(f"{seconds:.1f}")
        block, rows = _study(name, store, work, args, seconds)
        blocks[name] = block
        calibration += rows
        print(f"{name}: {seconds:.0f} s", flush=True)
    if not args.no_docs:
        blocks["calibration"] = _calibration_block(calibration)
        _update(args.docs, blocks)
        print(f"updated {args.docs} ({', '.join(blocks)})")
    return 0


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
        pattern = re.compile(rf"(<!-- gradsweep studies: {re.escape(name)} -->\n).*?(<!-- end {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"error: {doc} has no <!-- gradsweep studies: {name} --> ... <!-- end {name} --> block")
        text = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)
    doc.write_text(text)
