"""Shared fixtures: real tracking stores (embedded sqlite, a real `mlflow server`) and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradsweep.track.server import MlflowServer  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "src" / "train.py"


def run_train(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run src/train.py as a user would, in ``cwd`` (so outputs/ and multirun/ land there)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run([sys.executable, str(TRAIN), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def store(tmp_path) -> str:
    """An embedded tracking store URI in a temp dir."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()
