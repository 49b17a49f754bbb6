"""Every training part that a config group chooses: group -> option -> (schema, builder).

A part registers itself beside its schema with :func:`register`; the Hydra adapter stores each
schema as ``<group>/<option>_schema`` and the job builds through :func:`build`. Adding a model,
data set, optimizer or clipper touches its module and one YAML file in ``conf/<group>/``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

GROUPS = ("model", "data", "optimizer", "clip")
_MODULES = ("gradsweep.train.models", "gradsweep.train.data", "gradsweep.train.optim", "gradsweep.train.clipping",
            "gradsweep.train.user_code")


@dataclass(frozen=True)
class Part:
    schema: type  #: the dataclass that documents and validates the option's keys
    build: Callable[..., Any]
    data: tuple[str, ...] = ()  #: models only: the data sets the model can train on
    #: the option takes keys its schema does not list (``+model.hidden=64``): they become its ``kwargs``
    open_keys: bool = False


_PARTS: dict[str, dict[str, Part]] = {g: {} for g in GROUPS}


def register(group: str, name: str, schema: type, **extra: Any) -> Callable[[Callable], Callable]:
    def add(build: Callable) -> Callable:
        _PARTS[group][name] = Part(schema, build, **extra)
        return build
    return add


def parts(group: str) -> dict[str, Part]:
    for module in _MODULES:
        importlib.import_module(module)  # each registers its parts on import
    return _PARTS[group]


def build(group: str, cfg: Any, *args: Any) -> Any:
    return parts(group)[cfg.name].build(cfg, *args)
