"""The ``mlflow server`` command line, written once.

Three things start a tracking server and all of them build its command here:

* ``docker-compose.yml``'s ``mlflow`` service (PostgreSQL backend, MinIO artifacts), checked against
  :func:`mlflow_server_command` by ``tests/test_compose.py``;
* :class:`MlflowServer`, the real server the tests and benchmarks start and stop, so the flags CI
  exercises are the flags the team deploys;
* ``make server`` (``python -m gradsweep.track.server``): a local server on 127.0.0.1:5000 with the
  embedded store (``sqlite:///mlruns/server.db``, artifacts in ``mlruns/server-artifacts``), which
  ``tracking=server`` points jobs at.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

# Host headers the server answers. MLflow's own default admits localhost and private IPs only, so a
# client that reaches the server by a DNS name (the compose scheduler uses http://mlflow:5000) gets
# "403 Invalid Host header" on every API call while /health stays green. Add your own host name
# (MLFLOW_ALLOWED_HOSTS in .env) when you publish the server beyond this machine.
ALLOWED_HOSTS = "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*"

# Environment of every server started with this command. MLflow's server-side job runner (a huey
# consumer process for GenAI features: online trace scoring, trace archival) serves nothing
# gradsweep does; without it a server holds one process less and starts in about half the time.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(*, backend_store_uri: str, artifacts_destination: str, host: str = "127.0.0.1",
                          port: int | str = 5000, workers: int | str = 1, allowed_hosts: str = ALLOWED_HOSTS,
                          app_name: str | None = None, executable: str = "mlflow") -> list[str]:
    """Argv of a tracking server that proxies artifacts (clients up- and download through it, so
    they need no credentials for the artifact store). ``app_name="basic-auth"`` turns on MLflow's
    user/password authentication."""
    cmd = [executable, "server",
           "--host", host, "--port", str(port), "--workers", str(workers),
           "--backend-store-uri", backend_store_uri,
           "--artifacts-destination", artifacts_destination, "--serve-artifacts",
           "--allowed-hosts", allowed_hosts]
    if app_name:
        cmd += ["--app-name", app_name]
    return cmd


def wait_healthy(uri: str, proc, timeout_s: float = 90.0, log_path: Path | None = None) -> None:
    """Poll ``<uri>/health`` until it answers 200; raise if ``proc`` exits first or time runs out."""
    import time
    import urllib.parse
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path and log_path.is_file() else ""
            raise RuntimeError(f"mlflow server exited with status {proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                healthy = r.status == 200
        except OSError:
            healthy = False
        if healthy:
            if served_by(proc.pid, urllib.parse.urlsplit(uri).port) is False:
                raise RuntimeError(f"{uri} answers, but not from this mlflow server: another process took the port "
                                   "between choosing it and the server binding it")
            return
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server at {uri} did not become healthy in {timeout_s:.0f} s")


def stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, session, ..."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _session(pid: int | str) -> int:
    return int(stat_fields(pid)[3])


def stop_group(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), SIGKILL after
    ``wait_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def served_by(pid: int, port: int | None) -> bool | None:
    """Whether process ``pid`` or another of its session (the server's workers) holds the socket
    listening on ``port``; None where Linux's ``/proc`` cannot tell. A free port is chosen seconds
    before the server binds it: another process may bind it in between, and then a stranger would
    answer the health check."""
    inodes = set()
    try:
        sid = _session(pid)
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(f"socket:[{fields[9]}]")
    except (OSError, IndexError, ValueError):
        return None
    if not inodes:
        return None  # not in this network namespace
    for other in filter(str.isdigit, os.listdir("/proc")):
        try:
            if _session(other) == sid and any(os.readlink(f"/proc/{other}/fd/{fd}") in inodes
                                              for fd in os.listdir(f"/proc/{other}/fd")):
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def mlflow_executable() -> str:
    """The ``mlflow`` of this interpreter's environment, else the one on PATH."""
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow") or "mlflow"


def local_server_command(store: Path, port: int = 5000, host: str = "127.0.0.1",
                         allowed_hosts: str = ALLOWED_HOSTS) -> list[str]:
    """``make server``: the embedded store under ``store`` (normally ``mlruns/``)."""
    store = store.resolve()
    return mlflow_server_command(backend_store_uri=f"sqlite:///{store / 'server.db'}",
                                 artifacts_destination=str(store / "server-artifacts"),
                                 host=host, port=port, allowed_hosts=allowed_hosts, executable=mlflow_executable())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` child process on 127.0.0.1 (tests and benchmarks): it can be
    stopped and started again on the same port and store, as in an outage. The log is
    ``<root>/server-<port>.log``."""

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
        return mlflow_server_command(executable=mlflow_executable(), host="127.0.0.1", port=self.port, workers=1,
                                     backend_store_uri=self.backend, artifacts_destination=self.artifacts,
                                     app_name=self.app_name)

    def start(self, timeout: float = 90) -> "MlflowServer":
        log_path = self.root / f"server-{self.port}.log"
        with open(log_path, "a") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                         start_new_session=True, env={**os.environ, **SERVER_ENV, **self.env})
        try:
            wait_healthy(self.uri, self.proc, timeout, log_path)
        except BaseException:
            self.stop()  # not left running (and migrating its store) behind the error
            raise
        return self

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, 20)
        self.proc = None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gradsweep.track.server",
                                description="Start a local MLflow tracking server (what `make server` runs).")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--store", type=Path, default=Path("mlruns"), help="folder of server.db and server-artifacts/")
    p.add_argument("--allowed-hosts", default=ALLOWED_HOSTS,
                   help="Host headers answered (add this machine's name or address when --host is not loopback)")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    args = p.parse_args(argv)
    cmd = local_server_command(args.store, args.port, args.host, args.allowed_hosts)
    if args.print:
        print(" ".join(cmd))
        return
    args.store.mkdir(parents=True, exist_ok=True)
    os.environ.update(SERVER_ENV)
    print(f"MLflow tracking server on http://{args.host}:{args.port} (store: {args.store.resolve()}); "
          f"point jobs at it with tracking=server", flush=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
