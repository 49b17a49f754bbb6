"""Hydra's private parts gradsweep relies on (hydra-core 1.4.0rc3 and its launcher plugins).

Each is named below with why the public API does not serve; ``tests/test_compat.py`` checks each
against the installed Hydra. What the public API does serve is used directly elsewhere: the
compose API, ``ConfigLoader.get_sources()`` (whether an override names a config group), the
``options`` and ``missing_cfg_file`` of :class:`~hydra.errors.MissingConfigException`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Optional, Sequence

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.file_config_source import FileConfigSource as _FileConfigSource
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn
from omegaconf import DictConfig


class FileConfigSource(_FileConfigSource):
    """Hydra's config source for a folder of YAML files (``file://``), to subclass.

    :class:`gradsweep.sweep.sources.SweepsConfigSource` serves the ``sweeps/`` folder as the config
    group ``sweep``; it maps paths and inherits the reading (YAML, the ``# @package`` header, the
    listing). Hydra's public :class:`~hydra.plugins.config_source.ConfigSource` is abstract, and its
    one file-reading implementation lives in ``hydra._internal.core_plugins``."""


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Hydra's own command-line parser (``hydra._internal.utils.get_args_parser``) applied to ``argv``:
    the flags (``--help``, ``--cfg``, ``-m``, ``--config-name``, ...) and the overrides exactly as
    ``@hydra.main`` will read them. Preflight checks a command line before Hydra starts; the public
    ``hydra.main`` parses it only inside the decorated call, where it is too late to refuse it."""
    return get_args_parser().parse_intermixed_args(list(argv))


def apply_value_overrides(overrides: list[Override], cfg: DictConfig) -> None:
    """Set plain value overrides (``clip.max_norm=5``) on a composed config, in place, as Hydra's
    last step of composing does (``ConfigLoaderImpl._apply_overrides_to_config``, what ``compose``
    runs after merging the defaults list). The public ``compose`` only composes from scratch; this
    lets jobs that make the same config-group choices share one composition (preflight of a sweep)."""
    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def job_exception(ret: JobReturn) -> Any:
    """What a failed job raised (``JobReturn._return_value``). The public ``return_value`` re-raises
    it, but first writes "Error executing job with overrides: [...]" to stderr: a pruned Optuna
    trial is not an error and must not print one."""
    return ret._return_value


#: What ``JobReturn.return_value`` writes to stderr before it re-raises a failed job's exception;
#: the CLI drops the line (it reports the exception itself, and the overrides are the user's own).
JOB_ERROR_PREAMBLE = "Error executing job with overrides"


def is_job_error_preamble(text: str) -> bool:
    """Whether a write to stderr is Hydra's preamble to a failed job's exception (:data:`JOB_ERROR_PREAMBLE`)."""
    return text.startswith(JOB_ERROR_PREAMBLE)


def help_group_line(line: str) -> Optional[tuple[str, list[str]]]:
    """``(group, options)`` of a line of the config groups ``--help`` lists, else None.

    Hydra writes that list itself (``Hydra.format_config_groups``: ``<group>: <opt>, <opt>`` per
    line) straight to stdout, with no hook to filter the options it shows; the CLI rewrites those
    lines to leave out the typed schemas (``norm_schema``), which are not a user's choices."""
    group, sep, options = line.partition(": ")
    if not sep or not group.replace("/", "").replace("_", "").isalnum():
        return None
    return group, options.split(", ")


def format_help_group_line(group: str, options: list[str]) -> str:
    """The inverse of :func:`help_group_line`: a line as Hydra writes it."""
    return f"{group}: " + ", ".join(options)


#: The joblib launcher plugin announces each job from its private module ``_core`` (where its
#: ``launch`` function lives, logging with ``logging.getLogger(__name__)``), not from the module of
#: its launcher class.
JOBLIB_LAUNCHER_CORE = "hydra_plugins.hydra_joblib_launcher._core"


_ANNOUNCE = re.compile(r"^\s*#(\d+) : ")
_BATCH = re.compile(r"^Launching \d+ jobs locally$")


def job_announcement(message: str) -> Optional[int]:
    """The job index of a launcher's announcement of a job (``\\t#<idx> : <overrides>``, the line
    every Hydra launcher logs before it starts a job), else None."""
    match = _ANNOUNCE.match(message)
    return int(match.group(1)) if match else None


def is_batch_announcement(message: str) -> bool:
    """Whether ``message`` is the basic launcher's ``Launching <n> jobs locally``, logged per batch."""
    return bool(_BATCH.match(message))


def launcher_loggers(launcher: object) -> set[str]:
    """The loggers a Hydra launcher writes its ``#<idx> : <overrides>`` line to: the module of its
    class (Hydra's basic launcher, the submitit launchers and gradsweep's own log with
    ``logging.getLogger(__name__)``) and, for the joblib launcher, :data:`JOBLIB_LAUNCHER_CORE`.
    Hydra has no hook on that line; :mod:`gradsweep.sweep.trial_lines` filters those loggers."""
    module = type(launcher).__module__
    return {module, JOBLIB_LAUNCHER_CORE} if module.startswith("hydra_plugins.hydra_joblib_launcher") else {module}
