"""Command-line overrides read with Hydra's own parser only (no config composed, nothing heavy
imported): fast enough to run before PyTorch and MLflow load."""
from __future__ import annotations

from typing import Optional

from hydra.core.override_parser.overrides_parser import OverridesParser


def job_combinations(overrides: list[str]) -> list[list[str]]:
    """Expand discrete sweeps (``a=1,2 b=x,y`` -> 4 jobs). ``hydra.*`` overrides and
    non-discrete sweeps (ranges, intervals: drawn later by the sweeper) are left out."""
    combos: list[list[str]] = [[]]
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if not ov.is_sweep_override():
            values = [ov.input_line or ""]
        elif ov.is_discrete_sweep():
            values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            continue
        combos = [c + [v] for c in combos for v in values]
    return combos


def output_folder(overrides: list[str], multirun: bool) -> Optional[str]:
    """The folder a command line gives its job (``hydra.run.dir``) or sweep (``hydra.sweep.dir``);
    None for Hydra's time-stamped default (conf/config.yaml)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [v for k, _, v in (o.partition("=") for o in overrides) if k.lstrip("+~") == key]
    return given[-1].strip("'\"") if given else None
