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


#: ``clip_methods``: each rule and its own hyperparameter, (low, high, log scale); searched only when
#: the rule is drawn. The other keys of a rule keep their defaults (the papers' values).
CLIP_RULE_PARAMS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "none": {},
    "norm": {"clip.max_norm": (0.1, 100.0, True)},
    "autoclip": {"clip.percentile": (1.0, 90.0, True)},
    "agc": {"clip.clip_factor": (0.001, 1.0, True)},
    "zclip": {"clip.z_threshold": (1.0, 5.0, False)},
    "adagc": {"clip.lambda_rel": (1.0, 2.0, False)},
}


def clip_methods(cfg: DictConfig, trial: Any) -> None:
    """The clipping rule as a categorical, and only the drawn rule's own hyperparameter.

    A trial of ``clip=zclip`` has ``clip.z_threshold`` and nothing of the other rules: Optuna's
    importances and each run's MLflow params show only what the trial's rule used."""
    rule = trial.suggest_categorical("clip", list(CLIP_RULE_PARAMS))
    for name, (low, high, log) in CLIP_RULE_PARAMS[rule].items():
        trial.suggest_float(name, low, high, log=log)
