"""Delivery hooks: work a journal asks whichever process delivers it to do once the records before
it are on the store (``RunJournal.after_delivery``).

The layer that owns a hook marks it with :func:`delivery_hook` and the caller that wants it run hands
the function itself to the journal, which records its target ``<module>:<name>``; the delivering
process (the job's delivery process, the job's own close, ``gradsweep sync``) imports that target
when it reaches the record. So the track layer names no code above it, and the layering test sees
every dependency in the imports of the callers. A journal is data on disk: only a function under
``gradsweep.`` that is marked as a hook runs; any other target is refused, recorded as the hook's
error (the run's records are delivered all the same).

Journals written before hooks were named by target name them by a short name (``sweep_summary``,
``run_figure``, ``close_dead_runs``): they are refused like any unknown hook. Deliberately: a table
of those names here would put the report layer's names back into the track layer, a spooled journal
lives only until its store is reachable again, and what those hooks made (the sweep's summary, the
per-parameter figure) is drawn again from the store by ``gradsweep report``.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Iterable, TypeVar

H = TypeVar("H", bound=Callable[..., Any])
MARK = "gradsweep_delivery_hook"  #: attribute of a hook: the modules it imports when it runs
MODULE = r"gradsweep(?:\.\w+)+"  #: what a journal may name: a module under gradsweep.
TARGET = re.compile(rf"^({MODULE}):(\w+)$")


def is_gradsweep_module(name: object) -> bool:
    """Whether a journal's ``preload`` entry names a module this package holds (the only ones imported)."""
    return isinstance(name, str) and re.fullmatch(MODULE, name) is not None


def delivery_hook(*loads: str) -> Callable[[H], H]:
    """Mark a function as a delivery hook, called as ``fn(header=, run_id=, folder=, **kwargs)``.
    ``loads``: modules it imports when it runs (matplotlib behind them takes a while to import): a
    journal that announces the hook has them imported by its delivery process while it waits, so
    the hook is not on the path between a job's last step and its end."""
    def mark(fn: H) -> H:
        setattr(fn, MARK, (fn.__module__, *loads))
        return fn
    return mark


def hook_target(fn: Callable[..., Any]) -> str:
    """``<module>:<name>`` of a hook, as a journal records it."""
    target = f"{fn.__module__}:{fn.__qualname__}"
    if not TARGET.match(target) or not hasattr(fn, MARK):
        raise ValueError(f"{target} is not a delivery hook: a module-level function under gradsweep. "
                         "marked @delivery_hook")
    return target


def preload_modules(hooks: Iterable[Callable[..., Any]]) -> list[str]:
    """The modules the given hooks import when they run (what a journal's header announces)."""
    modules: list[str] = []
    for fn in hooks:
        hook_target(fn)
        modules += [m for m in getattr(fn, MARK) if m not in modules]
    return modules


def resolve_hook(target: str) -> Callable[..., Any]:
    """The function a journal's hook record names; ValueError for anything but a hook under gradsweep."""
    match = TARGET.match(target) if isinstance(target, str) else None
    try:
        fn = getattr(importlib.import_module(match[1]), match[2], None) if match else None
    except ModuleNotFoundError:
        fn = None
    if fn is None or not hasattr(fn, MARK):
        raise ValueError(f"unknown hook {target!r}; a hook is a function gradsweep.<module>:<name> marked "
                         "@delivery_hook")
    return fn
