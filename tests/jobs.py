"""In-process jobs for the study and diagnostics tests: the Hydra adapter's compose + the real job
(real training, real MLflow store), without a Python start-up per run."""
from __future__ import annotations

from pathlib import Path

from gradsweep.paths import CONF_DIR
from gradsweep.run.job import JobContext, JobOutcome, run_job
from gradsweep.sweep.hydra_adapter import compose_config, expand_jobs, to_spec


def compose_job(overrides: list[str], hydra_config: bool = False):
    return compose_config(CONF_DIR, overrides, hydra_config=hydra_config)


def study_variants(study: str) -> list[list[str]]:
    """The jobs ``python src/train.py -m experiment=<study>`` launches (the adapter's own expansion)."""
    return expand_jobs(CONF_DIR, [f"experiment={study}"])


def run_inprocess(overrides: list[str], out_dir: Path, store: str, figures: bool = False) -> JobOutcome:
    """One job of the real pipeline; the per-run figure is off unless asked for (matplotlib costs
    more than these short runs). ``store="memory"`` records through the in-memory backend."""
    tracking = ["tracking.backend=memory"] if store == "memory" else [f"tracking.uri={store}"]
    cfg = compose_job([*overrides, *tracking, f"tracking.log_figures={figures}"])
    return run_job(to_spec(cfg), JobContext(overrides=overrides, output_dir=out_dir))
