"""Optuna storages and pruners from config values: shared by the sweeper, its jobs and the scheduler."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.utils import instantiate
from sqlalchemy.exc import SQLAlchemyError

from gradsweep.locks import create_in_turn
from gradsweep.track.uri import absolute_sqlite, is_local_sqlite, sqlite_path


def resolve_storage_url(url: Optional[str]) -> Optional[str]:
    """Relative paths (``sqlite:///mlruns/optuna.db``, ``journal:optuna.log``) become absolute
    against the current directory, like the embedded MLflow store; their folder is created."""
    if url is None:
        return None
    url = str(url)
    if is_local_sqlite(url):
        return absolute_sqlite(url, create=True)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        path = path if path.is_absolute() else Path.cwd() / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"journal:{path}"
    if url.split("://", 1)[0] in ("postgresql", "postgres"):
        return _postgres_driver(url)
    return url


def _postgres_driver(url: str) -> str:
    """SQLAlchemy 2 reads ``postgresql://`` as psycopg (3); use psycopg2 when only that is installed."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def make_storage(url: Optional[str], heartbeat_interval: Optional[int] = None,
                 grace_period: Optional[int] = None) -> Any:
    """An Optuna storage for a resolved URL: None (in memory), RDB (sqlite, postgresql, mysql) or journal file.
    ``heartbeat_interval``/``grace_period`` (RDB only): see :mod:`gradsweep.sweep.optuna_stale`."""
    if url is None:
        return None
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}

    def rdb(**extra: Any) -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs, **extra)

    if is_local_sqlite(url):  # several local workers: wait for the write lock instead of failing at once
        return create_in_turn(lambda: rdb(engine_kwargs={"connect_args": {"timeout": 60}}), sqlite_path(url))
    try:
        return rdb()
    except SQLAlchemyError:  # two workers creating a fresh database's tables at once: the loser retries
        import time

        time.sleep(1.0)
        return rdb()


def make_pruner(cfg: Optional[dict[str, Any]]) -> optuna.pruners.BasePruner:
    if not cfg:
        return optuna.pruners.NopPruner()
    return instantiate(cfg, _execution_whitelist_=("optuna.pruners.*",))
