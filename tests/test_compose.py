"""docker-compose.yml and the deploy/ examples, checked without Docker (none runs here).

What the files run for real (the `mlflow server` command, PostgreSQL and its init script) is
started as real processes in tests/test_server_postgres.py; here: the files parse, every service
runs what it should, and nothing secret or world-reachable is committed.
"""
from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.server.security_utils import is_allowed_host_header

from conftest import ROOT, MlflowServer
from gradsweep.track.server import ALLOWED_HOSTS, SERVER_ENV, local_server_command, mlflow_server_command

pytestmark = pytest.mark.unit

COMPOSE = ROOT / "docker-compose.yml"
AUTH = ROOT / "docker-compose.auth.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "scheduler"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY\b|KEY_ID|TOKEN", re.I)
REQUIRED = ":?see .env.example"  # ${VAR:?...}: compose refuses to start while VAR is unset or empty
REF = re.compile(r"^\$\{[A-Z][A-Z0-9_]*:\?see \.env\.example\}$")  # required, no default: no value in the file
ANY_REF = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(:?-[^}]*|:\?[^}]*)?\}")
URL_CREDENTIALS = re.compile(r"://([^/@\s]+):([^/@\s]+)@")

# what the compose mlflow service must run: the tests' server command with the team's stores
COMPOSE_MLFLOW = dict(
    executable="mlflow", host="0.0.0.0", port="5000", workers="${MLFLOW_WORKERS:-4}",
    # the driver spelt out: SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3, which the image lacks
    backend_store_uri=(f"postgresql+psycopg2://${{POSTGRES_USER{REQUIRED}}}:${{POSTGRES_PASSWORD{REQUIRED}}}"
                       "@postgres:5432/mlflow"),
    artifacts_destination=f"s3://${{MINIO_BUCKET{REQUIRED}}}/",
    allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-%s}" % ALLOWED_HOSTS)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def strings(node):
    """Every string in a parsed YAML document (keys excluded)."""
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def flags(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a.startswith("--")]


def dockerfile(path: str) -> str:
    return (ROOT / path).read_text()


def test_services_images_and_commands(services):
    assert set(services) == SERVICES
    assert re.fullmatch(r"postgres:\d+", services["postgres"]["image"])  # a pinned major version
    assert re.fullmatch(r"minio/minio:RELEASE\.[0-9TZ-]+", services["minio"]["image"])
    assert services["minio"]["command"][:2] == ["server", "/data"]
    assert re.fullmatch(r"minio/mc:RELEASE\.[0-9TZ-]+", services["minio-init"]["image"])
    init_script = "\n".join(services["minio-init"]["command"])
    assert 'mc mb --ignore-existing "store/$${MINIO_BUCKET}"' in init_script
    assert services["minio-init"]["restart"] == "no"

    assert services["mlflow"]["build"]["dockerfile"] == "deploy/mlflow.Dockerfile"
    assert services["mlflow"]["command"] == mlflow_server_command(**COMPOSE_MLFLOW)
    assert env_of(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert SERVER_ENV.items() <= env_of(services["mlflow"]).items()  # the environment the tests' server has
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env_of(services["mlflow"]))

    sched = services["scheduler"]
    assert sched["build"]["dockerfile"] == "deploy/Dockerfile" and sched["command"] == ["gradsweep", "schedule"]
    env = env_of(sched)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["GRADSWEEP_OPTUNA_STORAGE"] == f"postgresql://${{POSTGRES_USER{REQUIRED}}}@postgres:5432/optuna"
    # libpq reads it; gradsweep refuses passwords in URIs
    assert env["PGPASSWORD"] == f"${{POSTGRES_PASSWORD{REQUIRED}}}"
    assert sched["init"] is True  # PID 1 that passes SIGTERM on, so the running trial can end KILLED


def test_dockerfiles():
    mlflow_image = dockerfile("deploy/mlflow.Dockerfile")
    assert "FROM python:3.11-slim" in mlflow_image
    # the server the team runs is the MLflow the tests start
    assert f'"mlflow[auth]=={mlflow.__version__}"' in mlflow_image  # [auth]: Flask-WTF, for basic-auth mode
    assert re.search(r"psycopg2-binary==[\d.]+", mlflow_image) and re.search(r"boto3==[\d.]+", mlflow_image)
    app_image = dockerfile("deploy/Dockerfile")
    assert "FROM python:3.11-slim" in app_image and "pip install -e ." in app_image
    for path in ("src", "conf", "sweeps", "pyproject.toml"):
        assert re.search(rf"^COPY {re.escape(path)}\b", app_image, re.M), path
    assert re.search(r"^USER (?!root)\w+", app_image, re.M) and re.search(r"^USER (?!root)\w+", mlflow_image, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored  # never in a build context


def test_dependencies_wait_for_health(services):
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                               "minio-init": {"condition": "service_completed_successfully"}}
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert services["scheduler"]["depends_on"]["mlflow"] == {"condition": "service_healthy"}
    assert services["scheduler"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_healthchecks(services):
    for name in ("postgres", "minio", "mlflow"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["interval"] and check["retries"] >= 3, name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "http://127.0.0.1:5000/health" in " ".join(services["mlflow"]["healthcheck"]["test"])


def test_mlflow_command_is_the_one_the_tests_run(services, tmp_path):
    """Same flags, in the same order, as the real server tests/conftest.py starts."""
    compose_cmd = services["mlflow"]["command"]
    assert flags(compose_cmd) == flags(MlflowServer(tmp_path).command())
    # the basic-auth override is that command plus --app-name basic-auth
    auth_cmd = load(AUTH)["services"]["mlflow"]["command"]
    assert auth_cmd == mlflow_server_command(**COMPOSE_MLFLOW, app_name="basic-auth")
    assert flags(auth_cmd) == flags(MlflowServer(tmp_path, app_name="basic-auth").command())


def test_allowed_hosts_admit_the_scheduler():
    """MLflow's default admits no DNS names: http://mlflow:5000 would get 403 on every API call."""
    hosts = ALLOWED_HOSTS.split(",")
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(hosts, host), host
    assert not is_allowed_host_header(hosts, "attacker.example:5000")


def test_postgres_init_creates_both_databases(services):
    mounts = services["postgres"]["volumes"]
    assert "./deploy/postgres:/docker-entrypoint-initdb.d:ro" in mounts
    sql = "\n".join(p.read_text() for p in sorted((ROOT / "deploy" / "postgres").glob("*.sql")))
    assert re.findall(r"^CREATE DATABASE (\w+);", sql, re.M) == ["mlflow", "optuna"]


def test_published_ports_bind_loopback():
    for path in (COMPOSE, AUTH):
        for name, service in load(path)["services"].items():
            for port in service.get("ports", []):
                assert isinstance(port, str) and port.startswith("127.0.0.1:"), (path.name, name, port)
    published = {p for s in load(COMPOSE)["services"].values() for p in s.get("ports", [])}
    assert published == {"127.0.0.1:5000:5000", "127.0.0.1:9001:9001"}


def test_no_secret_values_committed():
    for path in (COMPOSE, AUTH):
        doc = load(path)
        for name, service in doc["services"].items():
            for key, value in env_of(service).items():
                if SECRET_NAME.search(key):
                    assert REF.match(str(value)), f"{path.name}: {name}.{key} must be a ${{VAR}} reference"
        for s in strings(doc):
            for user, password in URL_CREDENTIALS.findall(s):
                assert REF.match(user) and REF.match(password), f"{path.name}: credentials in {s!r}"


def test_env_example_has_only_placeholders():
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    secrets = {k: v for k, v in values.items() if SECRET_NAME.search(k)}
    assert secrets and all(v == "" for v in secrets.values()), secrets  # empty: nothing to forget to replace
    # every variable the compose files need without a default is in .env.example, and required (${VAR:?...}):
    # compose refuses to start while it is unset or empty, so an unfilled .env never goes live
    refs = [m for path in (COMPOSE, AUTH) for s in strings(load(path)) for m in ANY_REF.finditer(s)]
    needed = {m.group(1) for m in refs if not (m.group(2) or "").startswith(":-")}
    assert needed <= set(values), needed - set(values)
    assert all(m.group(2) == REQUIRED for m in refs if m.group(1) in needed), [m.group(0) for m in refs]
    assert "12 characters" in ENV_EXAMPLE.read_text()  # MLflow's own minimum for the admin password
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"


def test_basic_auth_override():
    auth = load(AUTH)["services"]
    mlflow_env = env_of(auth["mlflow"])
    assert mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./deploy/mlflow/basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in auth["mlflow"]["volumes"]
    assert {"MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(mlflow_env)
    assert set(env_of(auth["scheduler"])) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    ini = configparser.ConfigParser()
    ini.read(ROOT / "deploy" / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["database_uri"].startswith("sqlite:////var/lib/mlflow-auth/")
    assert "admin_password" not in ini["mlflow"]  # from the environment only


def test_make_server_is_the_server_tracking_server_points_at():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^server:.*\n\t(.+)$", makefile, re.M).group(1)
    assert "-m gradsweep.track.server" in recipe
    cmd = local_server_command(Path("mlruns"))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5000"
    assert flags(cmd) == flags(mlflow_server_command(backend_store_uri="x", artifacts_destination="y"))
    server_yaml = (ROOT / "conf" / "tracking" / "server.yaml").read_text()
    assert "uri: ${oc.env:MLFLOW_TRACKING_URI,http://127.0.0.1:5000}" in server_yaml


def test_kubernetes_cronjob():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "cronjob.yaml").read_text()))
    (cron,) = [d for d in docs if d and d["kind"] == "CronJob"]
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:3] == ["gradsweep", "sweep", "run"] and (ROOT / "sweeps" / f"{argv[3]}.yaml").is_file()
    env = {e["name"]: e for e in container["env"]}
    for name, e in env.items():
        if SECRET_NAME.search(name):
            assert "secretKeyRef" in e.get("valueFrom", {}), name
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def unit(path: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return sections


def test_systemd_service_and_timer():
    folder = ROOT / "deploy" / "systemd"
    service = unit(folder / "gradsweep-sweep@.service")
    timer = unit(folder / "gradsweep-sweep@.timer")
    assert service["Service"]["Type"] == "oneshot"
    assert re.search(r"/gradsweep sweep run %i$", service["Service"]["ExecStart"])
    assert "OnCalendar" in timer["Timer"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
