"""Make the top-level ``sweeps/`` folder the Hydra config group ``sweep`` (``+sweep=<name>``).

``sweeps/<name>.yaml`` holds one named sweep (a ``# @package _global_`` config that selects the
sweeper and states its search space, budget, study and storage). Hydra finds config groups only as
sub-folders of a search-path root, and ``hydra.searchpath: [file://...]`` is resolved against the
current directory, so neither serves a ``sweeps/`` folder at the top of the checkout whatever the
working directory. Two small Hydra plugins do (both discovered by Hydra's plugin scan through
``src/hydra_plugins/gradsweep_plugin``):

* :class:`SweepsSearchPath` appends ``gradsweep-sweeps://<checkout>/sweeps`` to the search path;
* :class:`SweepsConfigSource` (a subclass of Hydra's file config source, which reads the files;
  :class:`gradsweep.compat.hydra.FileConfigSource`)
  presents the folder's files as the one group ``sweep``: ``sweep/<name>`` -> ``sweeps/<name>.yaml``.

Set ``GRADSWEEP_SWEEPS_DIR`` to use another folder.
"""
from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult
from hydra.plugins.search_path_plugin import SearchPathPlugin

from gradsweep.compat.hydra import FileConfigSource
from gradsweep.paths import SWEEPS_DIR

GROUP = "sweep"
SCHEME = "gradsweep-sweeps"


def sweeps_dir() -> Path:
    env = os.environ.get("GRADSWEEP_SWEEPS_DIR")
    return Path(env).resolve() if env else SWEEPS_DIR


class SweepsConfigSource(FileConfigSource):
    """A folder of YAML files served as config group ``sweep`` (and nothing else)."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    @staticmethod
    def _inner(config_path: str) -> Optional[str]:
        """``sweep/<x>`` -> ``<x>`` (a path inside the folder); None outside the group."""
        parts = config_path.strip("/").split("/", 1)
        if parts[0] != GROUP:
            return None
        return parts[1] if len(parts) > 1 else ""

    def load_config(self, config_path: str) -> ConfigResult:
        inner = self._inner(config_path)
        if not inner:
            raise ConfigLoadError(f"Config not found : {config_path}")
        return super().load_config(inner)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return self.available()
        inner = self._inner(config_path)
        return inner is not None and super().is_group(inner)

    def is_config(self, config_path: str) -> bool:
        inner = self._inner(config_path)
        return inner is not None and bool(inner) and super().is_config(inner)

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> builtins.list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if self.available() and results_filter in (None, ObjectType.GROUP) else []
        inner = self._inner(config_path)
        if inner is None or not super().is_group(inner):
            return []
        files: builtins.list[str] = []
        for name in os.listdir(os.path.join(self.path, inner)):
            self._list_add_result(files=files, file_path=f"{config_path.rstrip('/')}/{name}", file_name=name,
                                  results_filter=results_filter)
        return sorted(set(files))


class SweepsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = sweeps_dir()
        if folder.is_dir():
            search_path.append(provider="gradsweep-sweeps", path=f"{SCHEME}://{folder}")
