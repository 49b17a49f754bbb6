"""The private parts of Optuna and of Hydra's Optuna sweeper plugin (hydra-optuna-sweeper 1.4.0rc3)
that gradsweep relies on; ``tests/test_compat.py`` checks each against the installed versions.

The plugin's public class, ``OptunaSweeper``, is a thin shell that builds an ``OptunaSweeperImpl``
(in the plugin's private ``_impl`` module) and hands it ``setup`` and ``sweep``. The plugin's sweep
loop cannot be hooked (no pruner, COMPLETE for every return value, job folders numbered from 0 on
every invocation), so :mod:`gradsweep.sweep.optuna_loop` subclasses the implementation, replaces
``sweep`` and reuses the plugin's search-space parsing through its protected methods
(:data:`PLUGIN_METHODS`).
"""
from __future__ import annotations

from typing import Any, Union

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl as _OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from optuna.distributions import BaseDistribution

#: The plugin implementation's methods gradsweep's sweep loop calls (all but ``setup`` protected):
#: the search-space config as override strings, grid choices of a distribution, the directions,
#: and each trial's job overrides (it draws the trial's values).
PLUGIN_METHODS = ("setup", "_process_searchspace_config", "_parse_sweeper_params_config",
                  "_to_grid_sampler_choices", "_get_directions", "_configure_trials")


class OptunaSweeperImpl(_OptunaSweeperImpl):
    """The plugin's sweeper implementation (``hydra_plugins.hydra_optuna_sweeper._impl``), to subclass:
    the plugin exports no other class that runs its search-space handling."""


def params_from_overrides(overrides: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any], list[str]]:
    """``(search space, fixed params, fixed overrides)`` of the sweeper's ``params`` as override
    strings (``lr=interval(1e-4,1e-1)``, ``depth=choice(2,4)``): the plugin's parser of its own
    config syntax (``_impl.create_params_from_overrides``), which it does not export."""
    return create_params_from_overrides(overrides)


def use_impl(sweeper: Any, impl: OptunaSweeperImpl) -> None:
    """Make the plugin's public ``OptunaSweeper`` delegate ``setup`` and ``sweep`` to ``impl``: it
    keeps its implementation in the attribute ``sweeper``. Its ``__init__`` still instantiates the
    sampler and checks the arguments; only the object it delegates to is replaced."""
    sweeper.sweeper = impl


def trial_id(trial: Union[optuna.trial.Trial, optuna.trial.FrozenTrial]) -> int:
    """The storage's id of a trial (``trial._trial_id``), what ``BaseStorage`` methods take
    (``record_heartbeat``, ``set_trial_user_attr``) and what a job in another process opens its
    trial with (``optuna.trial.Trial(study, trial_id)``). Neither ``Trial`` nor ``FrozenTrial`` has a
    public id; the public route (``storage.get_trial_id_from_study_id_trial_number(
    storage.get_study_id_from_name(name), number)``) costs two storage queries per call, where
    Optuna's own ``Study.optimize`` reads ``trial._trial_id``."""
    return trial._trial_id
