"""Search spaces that Hydra's override syntax cannot state, for ``hydra.sweeper.custom_search_space``.

The Optuna sweeper calls ``fn(config, trial)`` after drawing ``hydra.sweeper.params``; every
parameter ``fn`` suggests becomes the override ``<name>=<value>`` of that trial's job.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def clip_norm_or_none(cfg: DictConfig, trial: Any) -> None:
    """``clip=none``, or ``clip=norm`` with ``clip.max_norm`` log-uniform in [0.1, 100].

    Conditional, so a ``clip=none`` trial has no ``clip.max_norm`` (in its MLflow params and in
    Optuna's importances) instead of a value that did nothing."""
    if trial.suggest_categorical("clip", ["norm", "none"]) == "norm":
        trial.suggest_float("clip.max_norm", 0.1, 100.0, log=True)
