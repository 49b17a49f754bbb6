"""Shared fixtures: real tracking stores (embedded sqlite, a real `mlflow server`) and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Tests run in parallel on few cores: an OpenMP thread that spins while it waits for its peers
# (libgomp's default) burns the core another test needs; a 2-thread job then ran 5x slower.
# Set before torch loads its OpenMP runtime here and inherited by every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from gradsweep.track.server import MlflowServer  # tests import it from here

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "src" / "train.py"


def run_train(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run src/train.py as a user would, in ``cwd`` (so outputs/ and multirun/ land there)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def stored(uri: str, run_id: str, path: str) -> Path:
    """Where an embedded store keeps a run's artifact ``path`` (a checkpoint there resumes a run)."""
    from urllib.parse import unquote, urlparse

    from mlflow.tracking import MlflowClient

    return Path(unquote(urlparse(MlflowClient(uri).get_run(run_id).info.artifact_uri).path)) / path


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with MLflow's schema, made once per test worker: creating the
    schema (every migration) costs 2-4 CPU-seconds, copying the file milliseconds. Tests about a
    store that does not exist yet make their own."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(folder: Path, template: Path, name: str = "mlflow.db") -> Path:
    """A copy of the migrated empty store at ``folder / name`` (what MLflow would create there)."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(template, folder / name))


@pytest.fixture
def store(tmp_path, migrated_db) -> str:
    """An embedded tracking store URI in a temp dir (empty, its schema in place)."""
    return f"sqlite:///{fresh_store(tmp_path / 'mlruns', migrated_db)}"


@pytest.fixture
def hydra_compose():
    """compose(overrides) -> the config with its hydra node, as train.py would compose it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gradsweep.sweep.hydra_adapter import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        yield lambda overrides: compose("config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()


@pytest.fixture
def mlflow_server(tmp_path, migrated_db):
    fresh_store(tmp_path, migrated_db, "server.db")
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


# The integration tier: modules that start real processes (train.py, mlflow server, PostgreSQL,
# schedulers, SIGKILL). Everything else is the unit tier: `pytest -m "not integration"` runs it in
# about a minute. The default run is both, in parallel (pytest-xdist, see pyproject.toml).
INTEGRATION = {"test_bad_input", "test_faults", "test_hostile_input", "test_sweep_e2e", "test_outage",
               "test_checkpoint_resume", "test_optuna_sweeps", "test_schedule", "test_server_postgres", "test_report",
               "test_cpu_threads", "test_browser", "test_team_stack", "test_slurm", "test_delivery_hooks",
               "test_owners", "test_data_parallel"}
# Longest modules first (seconds on a 2-core machine, --durations): pytest-xdist hands out whole
# modules in collection order, so the long ones start at once and the short ones fill the gaps at
# the end instead of one worker finishing a long module alone (35 s of idle worker measured).
LONGEST_FIRST = ["test_schedule", "test_sweep_e2e", "test_faults", "test_optuna_sweeps", "test_checkpoint_resume",
                 "test_outage", "test_examples", "test_data_parallel", "test_report", "test_user_code",
                 "test_dense_history", "test_team_stack", "test_server_postgres", "test_diagnostics", "test_browser",
                 "test_studies"]


def _module(item) -> str:
    return item.module.__name__.rpartition(".")[2]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _module(item) in INTEGRATION:
            item.add_marker(pytest.mark.integration)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))  # stable: order within a module kept
