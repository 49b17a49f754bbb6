"""gradsweep's Optuna sweeper for Hydra (``hydra/sweeper=gradsweep_optuna``).

It is Hydra's own Optuna sweeper plugin (``hydra-optuna-sweeper``) with what that plugin lacks for
our sweeps, added by subclassing (the sweep loop itself is in :mod:`gradsweep.sweep.optuna_loop`):

* pruning: a ``pruner`` config group (``median`` default, ``none``, ``hyperband``) and the Optuna
  trial handed to each job, which reports dev accuracy at every evaluation and stops when pruned;
* study continuation: the same ``study_name`` + ``storage`` goes on counting trials, and job
  folders are numbered by trial number, so a second invocation never overwrites the first;
* failed (diverged) trials told to Optuna as FAIL, ``max_failure_rate`` over the whole invocation;
* the sweep's MLflow parent run gets the best params and value, a CSV of every trial with its
  state and Optuna's figures; each child run is tagged with study name, trial number and state.

This module stays light (no Optuna or MLflow import): Hydra imports it through the plugin scan
(``src/hydra_plugins/gradsweep_plugin``) at every start, also for runs that do not sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_optuna_sweeper.config import Direction, OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import MISSING, DictConfig

from gradsweep.names import OPTUNA_STORE



# ---------------------------------------------------------------------------------- pruners
@dataclass
class MedianPrunerConf:
    """Prune a trial whose best dev accuracy so far is below the median of earlier trials at the same step."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # no pruning until this many trials have completed
    n_warmup_steps: int = 0  # no pruning at optimizer steps below this
    interval_steps: int = 1
    n_min_trials: int = 1  # reports needed at a step before comparing there


@dataclass
class NopPrunerConf:
    """Never prune."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class HyperbandPrunerConf:
    """Hyperband over optimizer steps (the ``step`` every evaluation is reported at)."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # "auto": the last step of the first completed trial
    reduction_factor: int = 3
    bootstrap_count: int = 0


# ---------------------------------------------------------------------------------- sweeper
@dataclass
class GradsweepOptunaSweeperConf(OptunaSweeperConf):
    """The plugin's config (sampler, direction, storage, study_name, n_trials, n_jobs,
    max_failure_rate, params, custom_search_space) with our defaults, plus ``pruner``."""

    _target_: str = "gradsweep.sweep.optuna_sweeper.GradsweepOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    direction: Any = Direction.maximize  # train.py returns best dev accuracy
    storage: Any = OPTUNA_STORE  # sqlite:///..., postgresql://..., journal:<file>, or null (in memory)
    study_name: Optional[str] = None  # name it to continue the study later; null: a new study every invocation
    n_trials: int = 20  # trials run by this invocation (a re-run adds as many again)
    n_jobs: int = 1  # trials asked and launched together; > 1 needs a parallel launcher to run concurrently
    max_failure_rate: float = 0.0  # stop once more than this fraction of n_trials has failed
    pruner: Any = MISSING  # hydra/sweeper/pruner: median | none | hyperband
    figures: bool = True  # Optuna's figures in the parent run (param importances take seconds on big studies)
    # RDB storages: the sweep process beats for each trial it runs every heartbeat_interval seconds; a
    # trial without a beat for grace_period seconds (null: twice the interval) is FAIL (its sweep process
    # was killed or its machine lost), found by the next invocation of the study on any host
    heartbeat_interval: int = 30
    grace_period: Optional[int] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="gradsweep_optuna", node=GradsweepOptunaSweeperConf, provider="gradsweep",
             replace=True)  # replace: a parallel launcher's worker imports this again over a copied store
    for name, node in (("median", MedianPrunerConf), ("none", NopPrunerConf), ("hyperband", HyperbandPrunerConf)):
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="gradsweep", replace=True)


class GradsweepOptunaSweeper(OptunaSweeper):
    """The plugin's sweeper with our sweep loop (:class:`~gradsweep.sweep.optuna_loop.GradsweepOptunaSweeperImpl`).

    Subclassed rather than rewritten: the plugin's __init__ still instantiates the sampler (with
    its execution whitelist) and validates the arguments; only the implementation object it
    delegates ``setup``/``sweep`` to is replaced by our subclass of it.
    """

    def __init__(self, sampler: Any, direction: Any, storage: Optional[Any], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, custom_search_space: Optional[str],
                 params: Optional[DictConfig], pruner: Optional[DictConfig] = None, figures: bool = True,
                 heartbeat_interval: int = 30, grace_period: Optional[int] = None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         custom_search_space, params)
        from gradsweep.compat.optuna import use_impl  # Optuna + MLflow: only when sweeping
        from gradsweep.sweep.optuna_loop import GradsweepOptunaSweeperImpl

        use_impl(self, GradsweepOptunaSweeperImpl(
            self.sweeper.sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
            custom_search_space, params, pruner=pruner, sampler_cfg=sampler, figures=figures,
            heartbeat_interval=heartbeat_interval, grace_period=grace_period))
