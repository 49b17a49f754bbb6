"""One short console line per Optuna trial: ``trial 7: lr=0.0404 num_layers=3 max_norm=5``.

Every Hydra launcher announces each job it starts as ``#<idx> : <its overrides>``; for an Optuna
trial that is every drawn value with 16 digits, every fixed override of the command line and the
job's sweep context (``hydra.job.env_set``), which Hydra's ``filter_overrides`` keeps because of its
``++``. The launcher's log call has no hook of its own, so the sweeper puts a :class:`logging.Filter`
(the standard library's public hook for exactly this) on the launcher's logger while it launches, and
the filter rewrites that one record into the trial's label. The job still gets all its overrides;
``.hydra/overrides.yaml`` in its folder has them as Hydra passed them.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Mapping

from gradsweep.compat.hydra import is_batch_announcement, job_announcement, launcher_loggers


class TrialLines(logging.Filter):
    """Rewrites a launcher's ``#<idx> : ...`` record into ``labels[idx]`` (job index = trial number) and
    drops the basic launcher's ``Launching 1 jobs locally`` before every trial."""

    def __init__(self, labels: Mapping[int, str]) -> None:
        super().__init__()
        self.labels = labels

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if is_batch_announcement(message):  # the sweep's first line says it
            return False
        idx = job_announcement(message)
        if idx is not None and idx in self.labels:
            record.msg, record.args = self.labels[idx], ()
        return True


@contextmanager
def trial_lines(labels: Mapping[int, str], launcher: object) -> Iterator[None]:
    """While launching: the launchers' announcement of trial ``n`` reads ``labels[n]``."""
    names = launcher_loggers(launcher)
    line = TrialLines(labels)
    for name in names:
        logging.getLogger(name).addFilter(line)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(line)
