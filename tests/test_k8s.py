"""deploy/k8s/, checked without a cluster (none runs here).

Every manifest against the Kubernetes API schema (kubernetes-validate's bundled schemas: offline,
strict, so a misspelt or misplaced field fails), no credential outside a Secret, the tracking
server's command against docker-compose.yml's (both are ``mlflow_server_command()``), and the Indexed
Job's worker command composed by Hydra in-process, as each worker composes it.
"""
from __future__ import annotations

import copy
import re
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from mlflow.server.security_utils import is_allowed_host_header

from conftest import ROOT
from gradsweep.track.server import ALLOWED_HOSTS, SERVER_ENV, mlflow_server_command
from gradsweep.track.uri import refuse_password

pytestmark = pytest.mark.unit

K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# the oldest Kubernetes the manifests are for (backoffLimitPerIndex: GA in 1.33) and the newest schema bundled
VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY\b|KEY_ID|TOKEN", re.I)
URL_CREDENTIALS = re.compile(r"://[^/@\s]+:[^/@\s]+@")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes expands $(VAR) in command and args


def documents(path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> list[dict]:
    return [d for path in MANIFESTS for d in documents(path)]


def pod_spec(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return (spec.get("template") or {}).get("spec")


def containers() -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", c) for d in all_documents() if pod_spec(d)
            for c in pod_spec(d)["containers"]]


def the(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in all_documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def flags(cmd: list[str]) -> list[str]:
    return [a for a in cmd if a.startswith("--")]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {"cronjob.yaml", "indexed-job.yaml", "mlflow-server.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path):
    docs = documents(path)
    assert docs, path
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_mistakes():
    """Strict validation is what catches them: a misspelt field, a field at the wrong level, a wrong type."""
    job = the("Job")
    for mutate in (lambda j: j["spec"].__setitem__("completionMod", j["spec"].pop("completionMode")),
                   lambda j: j["spec"]["template"]["spec"].__setitem__("completions", 4),
                   lambda j: j["spec"].__setitem__("parallelism", "4")):
        doc = copy.deepcopy(job)
        mutate(doc)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_credentials_only_from_secrets():
    for where, container in containers():
        env = container.get("env", [])
        for e in env:
            if SECRET_NAME.search(e["name"]):
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} must come from a Secret"
        for value in [e.get("value", "") for e in env] + container.get("command", []) + container.get("args", []):
            assert not URL_CREDENTIALS.search(value), f"{where}: credentials in {value!r}"
            refuse_password(where, value)  # what gradsweep itself refuses
        defined = {e["name"] for e in env}
        for arg in container.get("command", []) + container.get("args", []):
            for name in ENV_REF.findall(arg):
                assert name in defined, f"{where}: $({name}) is not in the container's env"


def test_tracking_server_runs_the_compose_command():
    """One source: the Deployment's command is mlflow_server_command() with the same flags, in the same
    order, as docker-compose.yml's mlflow service (tests/test_compose.py) and the server
    tests/test_team_stack.py starts; only the stores' addresses differ, and the database password is
    PGPASSWORD here, not part of the URI."""
    deployment = the("Deployment", "mlflow")
    (container,) = pod_spec(deployment)["containers"]
    cmd = container["command"]
    backend, artifacts = flag(cmd, "--backend-store-uri"), flag(cmd, "--artifacts-destination")
    assert cmd == mlflow_server_command(executable="mlflow", host="0.0.0.0", port="5000",
                                        workers=flag(cmd, "--workers"), backend_store_uri=backend,
                                        artifacts_destination=artifacts, app_name="basic-auth")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["mlflow"]
    auth = yaml.safe_load((ROOT / "docker-compose.auth.yml").read_text())["services"]["mlflow"]
    assert flags(cmd) == flags(auth["command"])  # on every address of the pod: always with basic auth
    assert backend.startswith("postgresql+psycopg2://") and urlsplit(backend).password is None
    assert artifacts.startswith("s3://")

    env = {e["name"]: e for e in container["env"]}
    assert set(compose["environment"]) <= set(env)  # what the compose server gets, this one gets
    assert {k: env[k].get("value") for k in SERVER_ENV} == SERVER_ENV
    for name in ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name

    (port,) = container["ports"]
    assert port["containerPort"] == int(flag(cmd, "--port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}  # exempt from --allowed-hosts
    service = the("Service", "mlflow")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": port["name"]}]


def test_jobs_reach_the_tracking_server():
    """Every job's MLFLOW_TRACKING_URI names the Service, with a Host header the server admits."""
    server_cmd = pod_spec(the("Deployment", "mlflow"))["containers"][0]["command"]
    admitted = flag(server_cmd, "--allowed-hosts").split(",")
    assert admitted == ALLOWED_HOSTS.split(",")
    uris = {where: e["value"] for where, c in containers() for e in c.get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"}
    assert set(uris) == {"CronJob/gradsweep-clip-only", "Job/gradsweep-clip-only-workers"}
    for where, uri in uris.items():
        parts = urlsplit(uri)
        assert parts.hostname == the("Service", "mlflow")["metadata"]["name"] and parts.port == 5000, where
        assert is_allowed_host_header(admitted, parts.netloc), where


def test_indexed_job_workers_share_one_study(hydra_compose, monkeypatch):
    """N pods, one named sweep, one PostgreSQL study; the sweep's budget split between them."""
    job = the("Job", "gradsweep-clip-only-workers")
    spec, pod = job["spec"], pod_spec(job)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert spec["backoffLimitPerIndex"] == 0 and pod["restartPolicy"] == "Never"  # a retry would run its share again
    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    # the Hydra entry point in the image's checkout (deploy/Dockerfile: WORKDIR /app, COPY src ./src), not
    # `gradsweep sweep run`, whose lock admits one run of a sweep at a time
    workdir = re.search(r"^WORKDIR (\S+)", (ROOT / "deploy" / "Dockerfile").read_text(), re.M).group(1)
    assert container["workingDir"] == workdir and argv[:3] == ["python", "src/train.py", "-m"]

    env = {e["name"]: e.get("value") for e in container["env"]}
    overrides = [ENV_REF.sub(lambda m: env[m.group(1)], a) for a in argv[3:]]
    (name,) = [o.split("=", 1)[1] for o in overrides if o.startswith("+sweep=")]
    assert (ROOT / "sweeps" / f"{name}.yaml").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    worker = hydra_compose(overrides)
    budget = hydra_compose([f"+sweep={name}"]).hydra.sweeper.n_trials
    sweeper = worker.hydra.sweeper
    assert sweeper.study_name == name and sweeper.storage == env["GRADSWEEP_OPTUNA_STORAGE"]
    assert sweeper.storage.startswith("postgresql://") and urlsplit(sweeper.storage).password is None
    assert spec["completions"] * sweeper.n_trials == budget
    assert worker.tracking.uri == env["MLFLOW_TRACKING_URI"]
    pgpassword = [e for e in container["env"] if e["name"] == "PGPASSWORD"]
    assert pgpassword and "secretKeyRef" in pgpassword[0]["valueFrom"]


def test_the_tracking_server_admits_only_the_projects_pods_and_signed_in_users():
    """A server on 0.0.0.0 without auth or a NetworkPolicy was open to every pod of the cluster."""
    deployment = the("Deployment", "mlflow")
    (container,) = pod_spec(deployment)["containers"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    (mount,) = container["volumeMounts"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(mount["mountPath"] + "/")
    ini = the("ConfigMap", "mlflow-basic-auth")["data"]["basic_auth.ini"]
    assert "database_uri = postgresql" in ini and "admin_password" not in ini
    refuse_password("basic_auth.ini", ini.split("database_uri = ")[1].split()[0])  # no password in it
    policy = the("NetworkPolicy", "mlflow")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": int(flag(container["command"], "--port"))}]
    (source,) = rule["from"]
    for doc in all_documents():  # every job of the project is admitted, and signs in
        if doc["kind"] in ("CronJob", "Job"):
            spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
            assert source["podSelector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
            names = {e["name"] for c in pod_spec(doc)["containers"] for e in c["env"]}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names
