"""Validate every job a command line describes before Hydra creates folders or we create runs.

Hydra's callbacks cannot stop a run (their exceptions become warnings), so the entry point
composes each job of a discrete command-line sweep (and, with ``-m``, of the discrete
``hydra.sweeper.params`` a preset sets) with Hydra's compose API and validates it against the
schema first. Values drawn later by a sweeper (Optuna ranges) are validated by
each job before it creates its run.
"""
from __future__ import annotations

import warnings
from typing import Optional

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from gradsweep.config import to_objects
from gradsweep.job import check_inputs


def job_combinations(overrides: list[str]) -> list[list[str]]:
    """Expand discrete sweeps (``a=1,2 b=x,y`` -> 4 jobs). ``hydra.*`` overrides and
    non-discrete sweeps (ranges, intervals: drawn later by the sweeper) are left out."""
    combos: list[list[str]] = [[]]
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.get_key_element()
        if key.lstrip("+~").startswith("hydra"):
            continue
        if not ov.is_sweep_override():
            values = [ov.input_line]
        elif ov.is_discrete_sweep():
            values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
        else:
            continue
        combos = [c + [v] for c in combos for v in values]
    return combos


def preflight(config_dir: str, default_config_name: str, argv: list[str]) -> Optional[int]:
    """Compose and validate each job; raise ConfigError (or Hydra's error) on the first bad one.

    Returns the number of jobs checked, or None when the command is not a training run
    (``--help``, ``--cfg``, ``--info``, a custom config path)."""
    args = get_args_parser().parse_intermixed_args(argv)
    if args.help or args.hydra_help or args.info or args.cfg or args.shell_completion \
            or args.config_path or args.config_dir or args.experimental_rerun:
        return None
    combos = job_combinations(args.overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _check_all(config_dir, args.config_name or default_config_name, combos, args.multirun)


def _config_sweep(cfg, combo: list[str]) -> list[list[str]]:
    """The discrete ``hydra.sweeper.params`` a config sets (an ``experiment=`` preset's variants),
    minus the keys the command line sets itself (those win, as in Hydra's sweepers)."""
    params = cfg.hydra.sweeper.get("params") or {}
    given = {ov.get_key_element() for ov in OverridesParser.create().parse_overrides(combo)}
    return job_combinations([f"{k}={v}" for k, v in params.items() if k not in given])


def _check_all(config_dir: str, config_name: str, combos: list[list[str]], multirun: bool = False) -> int:
    GlobalHydra.instance().clear()
    checked = 0
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            for combo in combos:
                cfg = compose(config_name=config_name, overrides=combo, return_hydra_config=multirun)
                variants = _config_sweep(cfg, combo) if multirun else [[]]
                for extra in variants:
                    job = compose(config_name=config_name, overrides=combo + extra) if extra else cfg
                    check_inputs(to_objects(job))
                    checked += 1
    finally:
        GlobalHydra.instance().clear()
    return checked
