"""Shared fixtures: real tracking stores (embedded sqlite, a real `mlflow server`) and a CLI runner."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gradsweep.server_cmd import SERVER_ENV, mlflow_server_command, wait_healthy

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "src" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None, backend: str | None = None,
                 artifacts: str | None = None, app_name: str | None = None, env: dict | None = None):
        self.root = root
        self.port = port or free_port()
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.artifacts = artifacts or str(root / "artifacts")
        self.app_name = app_name  # "basic-auth": user/password authentication
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # the same function docker-compose.yml's mlflow service is checked against (tests/test_compose.py)
        return mlflow_server_command(
            executable=shutil.which("mlflow") or str(Path(sys.executable).parent / "mlflow"),
            host="127.0.0.1", port=self.port, workers=1, backend_store_uri=self.backend,
            artifacts_destination=self.artifacts, app_name=self.app_name)

    def start(self, timeout: float = 90) -> "MlflowServer":
        self.log = open(self.root / f"server-{self.port}.log", "a")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True, env={**os.environ, **SERVER_ENV, **self.env})
        wait_healthy(self.uri, self.proc, timeout, self.root / f"server-{self.port}.log")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()
