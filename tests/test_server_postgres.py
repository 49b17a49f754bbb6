"""The team stack's tracking server, for real and without Docker.

A real PostgreSQL (tests/postgres.py) initialised with deploy/postgres/*.sql the way the postgres image
does it, a real ``mlflow server`` started with the command docker-compose.yml runs
(:func:`gradsweep.track.server.mlflow_server_command`, checked against the compose file by
tests/test_compose.py), and a sweep through the CLI. Artifacts go to a local folder where the compose
stack uses MinIO; the server proxies them either way, so clients download them through it.
"""
from __future__ import annotations

import configparser
import http.client
import secrets
import subprocess

import psycopg2
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, MlflowServer, run_train
from postgres import PostgresServer, _binary

pytestmark = pytest.mark.integration

STEPS = 10  # 2 epochs x ceil(300 / 64) optimizer steps


def init_databases(pg: PostgresServer) -> None:
    """What the postgres image does with /docker-entrypoint-initdb.d/*.sql on an empty volume."""
    psql = _binary("psql")
    if psql is None:
        pytest.skip("psql not installed")
    for sql in sorted((ROOT / "deploy" / "postgres").glob("*.sql")):
        res = subprocess.run([psql, "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc", "-h", "127.0.0.1",
                              "-p", str(pg.port), "-U", "postgres", "-d", "postgres", "-f", str(sql)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer(database="gradsweep").start()  # its own server: no database names shared with other tests
    try:
        init_databases(server)
        yield server
    finally:
        server.stop()


def db_uri(pg: PostgresServer, name: str) -> str:
    return f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/{name}"  # as docker-compose.yml spells it


def query(pg: PostgresServer, database: str, sql: str):
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname=database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def status_with_host(port: int, host: str, path: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        return conn.getresponse().status
    finally:
        conn.close()


def test_sweep_through_server_on_postgres(postgres, tmp_path):
    store = tmp_path / "artifact-store"
    server = MlflowServer(tmp_path, backend=db_uri(postgres, "mlflow"), artifacts=str(store)).start()
    try:
        res = run_train(["-m", "clip.max_norm=1,5", "trainer.epochs=2", f"tracking.uri={server.uri}"], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("gradsweep")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert parent.info.status == "FINISHED" and len(children) == 2
        assert sorted(float(c.data.params["clip.max_norm"]) for c in children) == [1.0, 5.0]
        downloads = tmp_path / "downloads"
        for c in children:
            assert c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parent.info.run_id
            history = client.get_metric_history(c.info.run_id, "grad_norm/total")
            assert sorted(m.step for m in history) == list(range(STEPS))
            assert c.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never sees the store
            for name in ("best.pt", "last.pt"):
                local = client.download_artifacts(c.info.run_id, f"checkpoints/{name}", str(downloads / c.info.run_id))
                state = torch.load(local, weights_only=True)
                assert state["config"]["clip"]["max_norm"] == float(c.data.params["clip.max_norm"])
                assert "rnn.U" in state["model"] and set(state) >= {"model", "optimizer", "step", "best_score"}
            assert state["step"] == STEPS  # last.pt
            png = client.download_artifacts(c.info.run_id, "figures/grad_norms.png", str(downloads / c.info.run_id))
            assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        png = client.download_artifacts(parent.info.run_id, "sweep/grad_norm_total.png", str(downloads))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert len(list(store.rglob("*.pt"))) == 4  # the server wrote them into its artifact destination

        # the runs live in PostgreSQL's mlflow database
        assert query(postgres, "mlflow", "SELECT status, count(*) FROM runs GROUP BY status") == [("FINISHED", 3)]
        assert query(postgres, "mlflow", "SELECT count(*) FROM metrics WHERE key = 'grad_norm/total'") == [(2 * STEPS,)]

        # the allowed hosts of the compose command: the scheduler's http://mlflow:5000 is served, others are not
        path = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=gradsweep"
        assert status_with_host(server.port, "mlflow:5000", path) == 200
        assert status_with_host(server.port, "attacker.example:5000", path) == 403
    finally:
        server.stop()


def test_optuna_database(postgres):
    """GRADSWEEP_OPTUNA_STORAGE's database: a study continues across connections."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = db_uri(postgres, "optuna")
    for _ in range(2):  # two scheduled runs of one sweep
        study = optuna.create_study(study_name="clip_only", storage=storage, direction="maximize", load_if_exists=True)
        study.optimize(lambda t: t.suggest_float("clip.max_norm", 0.1, 100, log=True), n_trials=2)
    trials = optuna.load_study(study_name="clip_only", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4


def test_basic_auth_mode(postgres, tmp_path, monkeypatch):
    """docker-compose.auth.yml: `--app-name basic-auth` with deploy/mlflow/basic_auth.ini; jobs sign in
    with MLFLOW_TRACKING_USERNAME/PASSWORD (what the scheduler service gets)."""
    ini = configparser.ConfigParser()
    ini.read(ROOT / "deploy" / "mlflow" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"  # the image keeps it on a volume
    with open(tmp_path / "basic_auth.ini", "w") as f:
        ini.write(f)
    password = secrets.token_urlsafe(18)
    query(postgres, "postgres", "SELECT 1")  # server up
    conn = psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow_auth_test")
    conn.close()
    server = MlflowServer(tmp_path, backend=db_uri(postgres, "mlflow_auth_test"), app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}).start()
    try:
        path = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert status_with_host(server.port, "127.0.0.1", path) == 401
        creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        res = run_train(["trainer.epochs=1", f"tracking.uri={server.uri}"], tmp_path, env=creds)
        assert res.returncode == 0, res.stderr[-3000:]
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
        assert run.info.status == "FINISHED" and "best/dev_acc" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == \
            {"checkpoints/best.pt", "checkpoints/last.pt"}
    finally:
        server.stop()
