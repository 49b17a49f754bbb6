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


# Tiers are declared by each module (`pytestmark = pytest.mark.unit` or `pytest.mark.integration`)
# or by a test (its own marker wins). The integration tier starts Python processes: train.py, the
# delivery process, servers, tools, schedulers. A test without a tier is a collection error, and a
# unit-tier test that starts a Python process or forks fails (the audit hook below), so a new slow
# test cannot land in the fast tier unnoticed; short tools such as git are allowed. `pytest -m "not
# integration"` runs the unit tier; the default run is both, in parallel (pytest-xdist, pyproject.toml).
TIERS = ("unit", "integration")
VENV_BIN = Path(sys.executable).parent
_in_unit_test = [False]


def _starts_python(event: str, args: tuple) -> bool:
    if event in ("os.fork", "os.forkpty", "os.posix_spawn"):
        return True
    if event != "subprocess.Popen" or not args or args[0] is None:
        return False
    exe = Path(os.fsdecode(args[0]))
    return exe.name.startswith("python") or exe.parent == VENV_BIN  # the interpreter or a script of its own


def _refuse_processes_in_unit_tests(event: str, args: tuple) -> None:
    if _in_unit_test[0] and _starts_python(event, args):
        raise RuntimeError(f"a unit-tier test started a Python process ({event}: {args[0]!r}); mark the test or "
                           "its module pytest.mark.integration")


sys.addaudithook(_refuse_processes_in_unit_tests)


def _tier(item) -> str | None:
    return next((m.name for m in item.iter_markers() if m.name in TIERS), None)  # closest first


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _in_unit_test[0] = _tier(item) == "unit"
    try:
        yield
    finally:
        _in_unit_test[0] = False


# Module durations of the last run (pytest's cache, kept in .pytest_cache): xdist hands out whole
# modules in collection order, so the long ones go first and the short ones fill the gaps at the end
# instead of one worker finishing a long module alone. Without a cache (a clean clone, CI) the
# integration tier goes first, which is where the long modules are.
DURATIONS_KEY = "gradsweep/module_durations"


def _module(nodeid: str) -> str:
    """A test's module name (``test_x``) from its node id, the same on workers and the controller."""
    return Path(nodeid.split("::")[0]).stem


def pytest_collection_modifyitems(config, items):
    undeclared = sorted({_module(item.nodeid) for item in items if _tier(item) is None})
    if undeclared:
        raise pytest.UsageError(f"{', '.join(undeclared)}: no test tier; declare pytestmark = pytest.mark.unit "
                                "or pytest.mark.integration at module level")
    last = config.cache.get(DURATIONS_KEY, {}) if getattr(config, "cache", None) else {}
    items.sort(key=lambda item: (_tier(item) != "integration", -last.get(_module(item.nodeid), 0.0)))  # stable


_durations: dict[str, float] = {}  # module -> seconds, summed over its tests' setup, call and teardown


def pytest_runtest_logreport(report):  # on the xdist controller too: every worker's reports reach it
    module = _module(report.nodeid)
    _durations[module] = _durations.get(module, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    # the controller only (workers have workerinput); no cache with -p no:cacheprovider
    if getattr(session.config, "cache", None) and _durations and not hasattr(session.config, "workerinput"):
        merged = {**session.config.cache.get(DURATIONS_KEY, {}), **_durations}
        session.config.cache.set(DURATIONS_KEY, {k: round(v, 1) for k, v in merged.items()})
