"""Re-run the seven studies over seeds and regenerate docs/studies.md's numbers.

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
rule's best learning rate and how often the rule clipped (:mod:`gradsweep.report.comparison`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Optional

from gradsweep.paths import CONF_DIR, ROOT, TRAIN

# this module is imported by every `gradsweep` command (its options describe the studies): MLflow,
# matplotlib and Hydra are imported in the functions that use them

FIGURES = ("grad_norm_total", "layer_grad_norms", "final_accuracy", "epoch_stats")


@dataclass(frozen=True)
class Settings:
    """How the studies are run and reported (``gradsweep studies``' options)."""

    seeds: int = 5  # trainer.seed=range(0,seeds)
    jobs: int = 2  # jobs in parallel (Hydra's joblib launcher)
    docs: Path = ROOT / "docs" / "studies.md"  # the document to update
    no_docs: bool = False  # run and report only; leave the docs as they are


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


def allowed_studies() -> list[str]:
    """Every name ``--only`` takes: the classic studies, the comparisons and the examples/ studies."""
    return classic_studies() + list(COMPARISONS) + list(EXAMPLE_STUDIES)


def regenerate(names: list[str], settings: Settings, workdir: Optional[Path] = None) -> int:
    """Run the studies ``names`` (each over ``settings.seeds`` seeds, on a fresh embedded store in
    ``workdir``, default a new temp dir) and update the document's blocks; 1 when a study failed."""
    from gradsweep.report.calibration import calibration_block

    work = workdir or Path(tempfile.mkdtemp(prefix="gradsweep-studies-"))
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work.resolve() / 'mlruns' / 'mlflow.db'}"
    print(f"{len(names)} studies x {settings.seeds} seeds in {work} ({settings.jobs} jobs at a time)", flush=True)
    blocks: dict[str, str] = {}
    calibration: list[list[str]] = []
    for name in names:
        if name in COMPARISONS:
            seconds = 0.0
            for preset, extra in _comparison_sweeps(name):
                took = _sweep(preset, extra, store, work, settings, lean=True)
                if took is None:
                    return 1
                seconds += took
            blocks[name] = _comparison(name, store, work, settings, seconds)
            print(f"{name}: {seconds:.0f} s", flush=True)
            continue
        if name in EXAMPLE_STUDIES:
            took = _sweep(name, [], store, work, settings, env=_examples_env())
            if took is None:
                return 1
            seconds = took
            blocks[name] = _example_block(name, store, work, settings, seconds)
            print(f"{name}: {seconds:.0f} s", flush=True)
            continue
        took = _sweep(name, [], store, work, settings)
        if took is None:
            return 1
        seconds = took
        block, rows = _study(name, store, work, settings, seconds)
        blocks[name] = block
        calibration += rows
        print(f"{name}: {seconds:.0f} s", flush=True)
    if not settings.no_docs:
        if any(n not in COMPARISONS and n not in EXAMPLE_STUDIES for n in names):  # no verdict labels to calibrate
            blocks["calibration"] = calibration_block(calibration)
        _update(settings.docs, blocks)
        print(f"updated {settings.docs} ({', '.join(blocks)})")
    return 0


def _examples_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "examples"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _example_block(name: str, store: str, work: Path, settings: Settings, seconds: float) -> str:
    """The table an examples/ study's own script prints from the store."""
    figure = settings.docs.parent / "figures" / f"{name}.png"
    cmd = [sys.executable, str(ROOT / EXAMPLE_STUDIES[name]), "--tracking-uri", store]
    cmd += [] if settings.no_docs else ["--figure", str(figure)]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=_examples_env(), check=True).stdout
    return (f"Generated by `gradsweep studies --only {name} --seeds {settings.seeds}` on {date.today().isoformat()} "
            f"in {seconds:.0f} s (2-core machine, {settings.jobs} jobs at a time), tables and figure "
            f"([{name}](figures/{name}.png)) by `{EXAMPLE_STUDIES[name]}`: " + out.strip())


def _sweep(preset: str, extra: list[str], store: str, work: Path, settings: Settings,
           lean: bool = False, env: dict[str, str] | None = None) -> float | None:
    """``train.py -m experiment=<preset> <extra> trainer.seed=range(0,N)`` once per --workdir; its seconds.
    ``lean``: no per-run figure and no checkpoint artifacts (a comparison reads metrics only)."""
    tag = preset + "".join(f"__{e.replace('=', '-').replace(',', '_')}" for e in extra)
    t0 = time.monotonic()
    cmd = [sys.executable, str(TRAIN), "-m", f"experiment={preset}", *extra, f"trainer.seed=range(0,{settings.seeds})",
           f"tracking.uri={store}", f"hydra.sweep.dir={work / 'multirun' / tag}"]
    if lean:
        cmd += ["tracking.log_figures=false", "tracking.log_checkpoints=false"]
    if settings.jobs > 1:
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={settings.jobs}"]
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


def _study(name: str, store: str, work: Path, settings: Settings, seconds: float) -> tuple[str, list[list[str]]]:
    """The study's block (its summary table, the figures the document shows refreshed) and its
    calibration rows."""
    from gradsweep.report.build import make_report, resolve
    from gradsweep.report.calibration import study_rows
    from gradsweep.track.delivery import mlflow_client

    rep = make_report(name, store, str(work / "reports" / name))
    runs = resolve(mlflow_client(store), name, store).runs
    shown = [fig for fig in FIGURES if fig in rep.files]
    if not settings.no_docs:  # refresh the figures the document shows (the others stay in the report)
        text = settings.docs.read_text()
        shown = [fig for fig in shown if f"figures/{name}_{fig}.png" in text]
        for fig in shown:
            shutil.copyfile(rep.files[fig], settings.docs.parent / "figures" / f"{name}_{fig}.png")
    table = rep.files["summary_md"].read_text().strip()
    block = (f"Generated by `gradsweep studies --seeds {settings.seeds}` on {date.today().isoformat()}: {len(runs)} "
             f"runs in {seconds:.0f} s (2-core machine, {settings.jobs} jobs at a time). Figures: "
             + (", ".join(f"[{fig}](figures/{name}_{fig}.png)" for fig in shown) or "in the report")
             + ".\n\n" + table)
    return block, study_rows(name, runs)


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


def _comparison(name: str, store: str, work: Path, settings: Settings, seconds: float) -> str:
    """The comparison's block: a table per preset, its figures, what the tables mean."""
    from gradsweep.report.comparison import NOTES, Preset, clip_runs, comparison_figures, comparison_tables
    from gradsweep.sweep.hydra_adapter import compose_config

    runs = clip_runs(name, store)
    presets = []
    for preset in COMPARISONS[name].presets:
        cfg = compose_config(CONF_DIR, [f"experiment={preset}"])
        presets.append(Preset(preset, cfg.model.name, float(cfg.clip.max_norm)))
    lines, panels, tuned = comparison_tables(runs, presets)
    figures = comparison_figures(name, panels, runs, tuned, store, work / "reports" / name)
    if not settings.no_docs:
        for fig in figures:
            shutil.copyfile(fig, settings.docs.parent / "figures" / fig.name)
    head = (f"Generated by `gradsweep studies --only {name} --seeds {settings.seeds}` on {date.today().isoformat()}: "
            f"{len(runs)} runs in {seconds:.0f} s (2-core machine, {settings.jobs} jobs at a time). Figures: "
            + ", ".join(f"[{f.stem}](figures/{f.name})" for f in figures) + ".")
    return "\n".join([head, "", *lines, NOTES])
