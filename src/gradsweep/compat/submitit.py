"""submitit's private parts that gradsweep's submitit launchers rely on (submitit 1.5, brought by
hydra-submitit-launcher 1.4.0rc3); ``tests/test_compat.py`` checks each against the installed version."""
from __future__ import annotations

from typing import Any


def shorten_result_wait(job: Any, seconds: float) -> None:
    """Wait at most ``seconds`` for the result file of ``job`` (``Job._results_timeout_s``, 15 s by
    default: time a slow shared filesystem may take to show the file). For a job the scheduler
    reports CANCELLED, TIMEOUT, OUT_OF_MEMORY, ... there is no file to wait for; submitit has no
    public setting of that wait, and a batch waited 15 s for every such job."""
    job._results_timeout_s = min(job._results_timeout_s, seconds)
