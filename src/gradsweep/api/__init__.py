"""The public Python API (``import gradsweep``): what code of the user's own calls.

* :func:`history` — a run's dense per-step history as a pandas DataFrame;
* :func:`watch` — the product's telemetry, clippers and verdict in a training loop of your own.

May import: train, track, report, run (never Hydra or Optuna: a user's script does not need them).
"""
from __future__ import annotations

from gradsweep.api.watch import Watch, watch
from gradsweep.track.history import history

__all__ = ["history", "watch", "Watch"]
