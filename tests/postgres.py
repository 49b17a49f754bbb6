"""A real PostgreSQL server for tests: ``initdb`` + ``postgres`` in a temp dir, on a free port.

PostgreSQL refuses to run as root, so under root the server runs as an unprivileged user (the
Debian ``postgres`` user, or ``gradsweep-pg`` created with ``useradd`` when there is none); the
data dir is a fresh ``mkdtemp`` folder handed to that user. Authentication is ``trust`` on
127.0.0.1 only. Use the fixture (import it into a test module, ``from postgres import
postgres_server  # noqa: F401``) or :class:`PostgresServer` directly.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from gradsweep.track.server import free_port

FALLBACK_USER = "gradsweep-pg"


def _binary(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):  # Debian keeps them here
        if (folder / name).is_file():
            return str(folder / name)
    return None


def _server_user() -> Optional[pwd.struct_passwd]:
    """None when not root (run as ourselves); else an unprivileged user, created if needed."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", FALLBACK_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", FALLBACK_USER],
                   check=True, capture_output=True)
    return pwd.getpwnam(FALLBACK_USER)


class PostgresServer:
    def __init__(self, database: str = "gradsweep"):
        self.database = database
        self.port = free_port()
        self.user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="gradsweep-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.proc: Optional[subprocess.Popen] = None
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    @property
    def uri(self) -> str:
        """SQLAlchemy URL of the test database (role ``postgres``, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _demote(self):
        if self.user is None:
            return None
        uid, gid = self.user.pw_uid, self.user.pw_gid

        def run_as_user():
            os.setgid(gid)
            os.setuid(uid)

        return run_as_user

    def _run(self, args: list[str]) -> None:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        res = subprocess.run(args, preexec_fn=self._demote(), capture_output=True, text=True, cwd=self.root, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {res.stderr[-2000:]}")

    def start(self, timeout: float = 60) -> "PostgresServer":
        initdb, postgres = _binary("initdb"), _binary("postgres")
        if not initdb or not postgres:
            pytest.skip("PostgreSQL server binaries (initdb, postgres) not installed")
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        log = open(self.log_path, "a")
        if self.user is not None:
            os.chown(self.log_path, self.user.pw_uid, self.user.pw_gid)
        self.proc = subprocess.Popen(
            [postgres, "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.root),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=100"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._demote(), cwd=self.root,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"})
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log_path.read_text()[-2000:]}")
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError as e:
                if time.monotonic() > deadline:
                    log = self.log_path.read_text()[-2000:]
                    raise RuntimeError(f"postgres did not accept connections: {log}") from e
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: PostgreSQL's "fast" shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    yield server
    server.stop()
