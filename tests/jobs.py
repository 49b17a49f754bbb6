"""In-process jobs for the study and diagnostics tests: Hydra's compose API + the real job
(real training, real MLflow store), without a Python start-up per run."""
from __future__ import annotations

import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from gradsweep.config import register_schemas
from gradsweep.job import JobContext, JobOutcome, run_job

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
register_schemas()


def compose_job(overrides: list[str], hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=CONF, version_base=None):
            return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def study_variants(study: str) -> list[list[str]]:
    """The jobs ``python src/train.py -m experiment=<study>`` launches: the cartesian product of the
    preset's ``hydra.sweeper.params`` (as the basic sweeper expands them)."""
    cfg = compose_job([f"experiment={study}"], hydra_config=True)
    params = cfg.hydra.sweeper.params or {}
    combos: list[list[str]] = [[f"experiment={study}"]]
    for ov in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = ov.get_key_element()
        values = [f"{key}={v}" for v in ov.sweep_string_iterator()] if ov.is_sweep_override() else [ov.input_line]
        combos = [c + [v] for c in combos for v in values]
    return combos


def run_inprocess(overrides: list[str], out_dir: Path, store: str, figures: bool = False) -> JobOutcome:
    """One job of the real pipeline; the per-run figure is off unless asked for (matplotlib costs
    more than these short runs)."""
    cfg = compose_job([*overrides, f"tracking.uri={store}", f"tracking.log_figures={figures}"])
    return run_job(cfg, JobContext(overrides=overrides, output_dir=out_dir))
