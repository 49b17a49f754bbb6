"""gradsweep's Hydra plugins, found by Hydra's scan of the ``hydra_plugins`` namespace package
(``src/`` is on ``sys.path``: ``src/train.py`` puts it there, and so does ``pip install -e .``).

* ``hydra/sweeper=gradsweep_optuna`` and ``hydra/sweeper/pruner=median|none|hyperband``
  (:mod:`gradsweep.sweep.optuna_sweeper`);
* the ``sweep`` config group served from the top-level ``sweeps/`` folder (:mod:`gradsweep.sweep.sources`).

Hydra imports this module at every start, so it imports nothing heavy (no Optuna, MLflow, torch).
"""
from gradsweep.sweep.optuna_sweeper import GradsweepOptunaSweeper, register_configs
from gradsweep.sweep.sources import SweepsConfigSource, SweepsSearchPath

register_configs()

__all__ = ["GradsweepOptunaSweeper", "SweepsConfigSource", "SweepsSearchPath"]
