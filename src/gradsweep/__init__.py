"""gradsweep: sweeps that record what every gradient did at every step.

Subpackages by layer; each imports only the layers below it (``tests/test_layers.py`` checks it):

* :mod:`gradsweep.train`  the training parts and the loop: torch, numpy, scikit-learn only;
* :mod:`gradsweep.track`  the run-logger seam and its MLflow backend (journal, delivery, store);
* :mod:`gradsweep.report` figures and tables from runs;
* :mod:`gradsweep.run`    one job: a typed spec -> train -> a recorded run;
* :mod:`gradsweep.sweep`  Hydra and Optuna: compose and validate, sweeps, studies, schedules;
* :mod:`gradsweep.cli`    the ``gradsweep`` command and the ``train.py`` error reporting;
* :mod:`gradsweep.api`    the public Python API, re-exported here: ``gradsweep.history(run_id)``,
  ``gradsweep.watch(model, ...)``.

Beside them, used by every layer: ``names`` (metric and tag names), ``errors``, ``checks``
(schema range checks), ``paths`` (where the checkout's parts are) and ``locks`` (file locks).
"""

__all__ = ["history", "watch", "Watch"]


def __getattr__(name: str):
    """``gradsweep.history`` and the rest of :mod:`gradsweep.api`, imported on first use (``import
    gradsweep`` stays free of pandas and MLflow)."""
    if name in __all__:
        import gradsweep.api

        return getattr(gradsweep.api, name)
    raise AttributeError(f"module 'gradsweep' has no attribute {name!r}")
