"""The team stack of docker-compose.yml, verified without Docker (no engine runs here).

Its services run as real processes on 127.0.0.1, configured from the compose file itself:

* ``postgres``: a real PostgreSQL (tests/postgres.py) initialised with deploy/postgres/*.sql, as the
  image does on an empty volume;
* ``minio`` + ``minio-init``: an S3-compatible server from PyPI in MinIO's place (moto's standalone
  server), the bucket created first, as minio-init does;
* ``mlflow``: the compose service's own command and environment, its ``${VAR}`` filled in and its
  service names pointed at the processes above. It equals what
  :func:`gradsweep.track.server.mlflow_server_command` builds for :class:`MlflowServer`, which starts it.

A real sweep with two worker processes (``hydra/launcher=joblib``) logs to that server with no S3
credentials in its environment (the server proxies artifacts); its checkpoints and figures must land
in the bucket and download through the server byte for byte.
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import boto3
import mlflow
import psycopg2
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, TRAIN, MlflowServer
from gradsweep.track.server import (SERVER_ENV, free_port, mlflow_executable, mlflow_server_command, served_by,
                                    stop_group)
from postgres import PostgresServer
from test_server_postgres import init_databases  # what the postgres image does with deploy/postgres/*.sql

pytestmark = pytest.mark.integration

# .env of this stack (the compose file reads every credential from .env)
ENV = {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": secrets.token_hex(12),  # the test server trusts 127.0.0.1
       "MINIO_ROOT_USER": "gradsweep-s3", "MINIO_ROOT_PASSWORD": secrets.token_hex(12),
       "MINIO_BUCKET": "gradsweep-artifacts",
       "MLFLOW_WORKERS": "1"}  # 2 cores; the compose default is 4
CHILD_ARTIFACTS = ("checkpoints/best.pt", "checkpoints/last.pt", "figures/grad_norms.png")
PARENT_ARTIFACTS = ("sweep/grad_norm_total.png",)
SWEEP_TIMEOUT_S = 120  # a few times what the sweep takes; one that hangs on exit fails in this time, not in 300 s

_VAR = re.compile(r"\$\$|\$\{([A-Z][A-Z0-9_]*)(?::-([^}]*)|:\?([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax as the compose files use it: ``${VAR}``, ``${VAR:-default}``,
    ``${VAR:?message}`` (required: compose refuses to start while it is unset or empty), ``$$``."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default, required = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if required is not None:
            raise KeyError(f"required variable {name} is missing a value: {required}")
        if default is None:
            raise KeyError(f"${{{name}}} is not set and has no default")
        return default
    return _VAR.sub(one, str(value))


def on_this_machine(value: str, addresses: dict[str, str]) -> str:
    """``postgres:5432`` (a compose service on the compose network) -> the process here."""
    for service, local in addresses.items():
        value = re.sub(rf"(?<=[@/]){re.escape(service)}\b", local, value)
    return value


def compose_mlflow(env: dict[str, str], addresses: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The compose ``mlflow`` service's argv and environment, as they would run with ``env`` as .env."""
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["mlflow"]
    argv = [on_this_machine(interpolate(a, env), addresses) for a in service["command"]]
    environment = {k: on_this_machine(interpolate(v, env), addresses) for k, v in service["environment"].items()}
    return argv, environment


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


class MotoS3:
    """moto's standalone S3 server (``python -m moto.server``), in MinIO's place."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.log_path = root / "moto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
            except urllib.error.HTTPError:
                pass  # it answered
            except OSError:
                time.sleep(0.1)
                continue
            if served_by(self.proc.pid, self.port) is False:
                raise RuntimeError(f"port {self.port} is served by another process, not this moto server")
            return
        raise RuntimeError(f"moto server did not answer in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, 10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("team-stack")
    timings = {}
    t_moto = time.monotonic()
    s3_server = MotoS3(root).start()  # it imports while PostgreSQL starts
    pg = server = None
    try:
        t = time.monotonic()
        pg = PostgresServer(database="team_stack").start()
        init_databases(pg)
        timings["postgres"] = time.monotonic() - t
        s3_server.wait_ready()
        timings["moto"] = time.monotonic() - t_moto

        addresses = {"postgres:5432": f"127.0.0.1:{pg.port}", "minio:9000": f"127.0.0.1:{s3_server.port}"}
        compose_argv, compose_env = compose_mlflow(ENV, addresses)
        s3 = boto3.client("s3", endpoint_url=compose_env["MLFLOW_S3_ENDPOINT_URL"],  # the server's credentials
                          aws_access_key_id=compose_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=compose_env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        s3.create_bucket(Bucket=ENV["MINIO_BUCKET"])  # minio-init: mc mb --ignore-existing store/$MINIO_BUCKET

        t = time.monotonic()
        for attempt in range(3):
            server = MlflowServer(root, backend=flag(compose_argv, "--backend-store-uri"),
                                  artifacts=flag(compose_argv, "--artifacts-destination"), env=compose_env)
            try:
                server.start()
                break
            except RuntimeError as e:  # tests running beside this one start servers on free ports too
                server = None
                if "took the port" not in str(e) or attempt == 2:
                    raise
        timings["mlflow server"] = time.monotonic() - t
        yield SimpleNamespace(root=root, pg=pg, s3=s3, bucket=ENV["MINIO_BUCKET"], server=server,
                              compose_argv=compose_argv, compose_env=compose_env, timings=timings)
    finally:
        if server is not None:
            server.stop()
        s3_server.stop()
        if pg is not None:
            pg.stop()
        print("team stack timings (s):", {k: round(v, 1) for k, v in timings.items()})


def test_the_server_runs_the_compose_command(stack):
    """One source: the compose file's mlflow command is the one started here, flag for flag, with only
    its address changed (the container binds 0.0.0.0:5000, published on 127.0.0.1)."""
    expected = list(stack.compose_argv)
    expected[expected.index("--host") + 1] = "127.0.0.1"
    expected[expected.index("--port") + 1] = str(stack.server.port)
    expected[0] = mlflow_executable()  # the image's `mlflow` on PATH; here this environment's
    assert stack.server.command() == expected
    assert expected == mlflow_server_command(
        executable=mlflow_executable(), host="127.0.0.1", port=stack.server.port, workers=1,
        backend_store_uri=f"postgresql+psycopg2://postgres:{ENV['POSTGRES_PASSWORD']}@127.0.0.1:{stack.pg.port}/mlflow",
        artifacts_destination=f"s3://{ENV['MINIO_BUCKET']}/")
    assert SERVER_ENV.items() <= stack.compose_env.items()


def job_env() -> dict[str, str]:
    """A client of the team stack: a tracking URI and nothing for S3 (no AWS_*, no MLFLOW_S3_*)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_S3_")) and k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # two worker processes on a 2-core machine
    return env


@pytest.fixture(scope="module")
def sweep(stack):
    """``python src/train.py -m`` with two joblib workers, logging to the stack's server."""
    cwd = stack.root / "jobs"
    cwd.mkdir()
    log_path = cwd / "sweep.log"
    t = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(TRAIN), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "clip.max_norm=1,5",
             "trainer.epochs=1", f"tracking.uri={stack.server.uri}"],
            cwd=cwd, env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(SWEEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out = log_path.read_text()
            hint = " although its jobs had ended (the summary is printed)" if "Compare the runs" in out else ""
            pytest.fail(f"the sweep did not exit in {SWEEP_TIMEOUT_S} s{hint}:\n{out[-3000:]}")
    stack.timings["sweep"] = time.monotonic() - t
    out = log_path.read_text()
    assert code == 0, out[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out  # the joblib launcher ran it

    client = MlflowClient(stack.server.uri)
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags),
                      key=lambda r: float(r.data.params["clip.max_norm"]))
    return SimpleNamespace(client=client, experiment_id=exp.experiment_id, parent=parent, children=children)


def test_sweep_of_two_workers_on_postgres(stack, sweep):
    parent, children = sweep.parent, sweep.children
    assert parent.info.status == "FINISHED" and [float(c.data.params["clip.max_norm"]) for c in children] == [1.0, 5.0]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # two worker processes, neither of them the sweep's own
    workers = {c.data.tags["gradsweep.worker"] for c in children}
    assert len(workers) == 2 and parent.data.tags["gradsweep.worker"] not in workers

    conn = psycopg2.connect(host="127.0.0.1", port=stack.pg.port, user="postgres", dbname="mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid, status, artifact_uri FROM runs")
            rows = cur.fetchall()
    finally:
        conn.close()
    assert {r[0] for r in rows} == {parent.info.run_id, *(c.info.run_id for c in children)}
    assert {r[1] for r in rows} == {"FINISHED"}
    # proxied: the store holds mlflow-artifacts: URIs; the bucket is the server's business only
    assert all(r[2] == f"mlflow-artifacts:/{sweep.experiment_id}/{r[0]}/artifacts" for r in rows), rows


def test_checkpoints_and_figures_land_in_the_bucket_and_download_through_the_server(stack, sweep, tmp_path):
    import torch

    listing = stack.s3.list_objects_v2(Bucket=stack.bucket)
    keys = {o["Key"] for o in listing.get("Contents", [])}
    assert not listing["IsTruncated"]
    wanted = [(sweep.parent, PARENT_ARTIFACTS), *((c, CHILD_ARTIFACTS) for c in sweep.children)]
    run_ids = {run.info.run_id for run, _ in wanted}
    assert {k.split("/")[1] for k in keys} == run_ids and all(k.startswith(f"{sweep.experiment_id}/") for k in keys)
    for run, paths in wanted:
        run_id = run.info.run_id
        downloaded = {}
        for path in paths:
            key = f"{sweep.experiment_id}/{run_id}/artifacts/{path}"
            assert key in keys, sorted(keys)
            in_bucket = stack.s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(tmp_path / run_id), tracking_uri=stack.server.uri)
            assert Path(local).read_bytes() == in_bucket, key
            downloaded[path] = local
            if path.endswith(".png"):
                assert in_bucket[:8] == b"\x89PNG\r\n\x1a\n"
        if run is not sweep.parent:  # the checkpoint is this run's: its config carries the run's max_norm
            state = torch.load(downloaded["checkpoints/best.pt"], weights_only=True)
            assert state["config"]["clip"]["max_norm"] == float(run.data.params["clip.max_norm"])


def test_an_env_copied_from_the_example_and_not_filled_in_is_refused():
    """`cp .env.example .env` without filling it in: compose (${VAR:?...}) refuses to start, so no
    placeholder secret can go live."""
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    with pytest.raises(KeyError, match="required variable POSTGRES_PASSWORD is missing a value: see .env.example"):
        compose_mlflow(example, {})
