"""`gradsweep report` on runs made in the test by the real CLI (`python src/train.py -m experiment=...`),
against the embedded store and a real `mlflow server`."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from mlflow.tracking import MlflowClient

from conftest import run_train
from gradsweep.cli.main import main as gradsweep

pytestmark = pytest.mark.integration

FILES = {"grad_norm_total.png", "layer_grad_norms.png", "final_accuracy.png", "summary.md", "summary.csv", "runs.csv"}
GRADSWEEP = Path(sys.executable).parent / "gradsweep"


def parents(client):
    exp = client.get_experiment_by_name("gradsweep")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("gradsweep.role") == "sweep"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep of the mlp_vanishing study, shortened to 20 full-batch steps: 3 runs."""
    tmp = tmp_path_factory.mktemp("report")
    store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    res = run_train(["-m", "experiment=mlp_vanishing", "trainer.epochs=20", "tracking.log_figures=false",
                     f"tracking.uri={store}"], tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    (parent,) = parents(MlflowClient(store))
    return store, parent.info.run_id, res, tmp


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_console_summary_says_vanishing(sweep):
    _, _, res, _ = sweep
    out = res.stdout + res.stderr
    flagged = [line for line in out.splitlines() if "grad_health=" in line]
    assert len(flagged) == 3
    assert sum("WARNING" in line and "grad_health=vanishing: first-layer gradient is" in line for line in flagged) == 1
    assert sum("grad_health=ok" in line for line in flagged) == 2


def test_report_of_sweep_parent(sweep, tmp_path, capsys):
    store, parent, _, _ = sweep
    out = tmp_path / "rep"
    assert gradsweep(["report", parent, "--tracking-uri", store, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == FILES
    for png in out.glob("*.png"):  # a drawn figure (not an empty canvas), whatever the PNG encoder's byte count
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(png)
        assert min(img.shape[:2]) >= 200 and img[..., :3].std() > 0.01, (png.name, img.shape)
    rows = read_csv(out / "runs.csv")
    by_act = {r["model.activation"]: r for r in rows}
    assert set(by_act) == {"sigmoid", "relu", "leaky_relu"}  # the swept value is the differing param
    assert by_act["sigmoid"]["grad_health"] == "vanishing" and by_act["relu"]["grad_health"] == "ok"
    assert all(r["status"] == "FINISHED" for r in rows)
    assert float(by_act["sigmoid"]["health/first_last_ratio"]) < 1e-7 < float(by_act["relu"]["health/first_last_ratio"])
    assert float(by_act["relu"]["health/dead_relu_frac"]) == 0.0
    client = MlflowClient(store)
    for r in rows:  # the table holds the store's values
        run = client.get_run(r["run_id"])
        assert float(r["test/acc"]) == run.data.metrics["test/acc"]
        assert r["grad_health"] == run.data.tags["grad_health"]
    configs = {r["model.activation"]: r for r in read_csv(out / "summary.csv")}  # one seed: one run per configuration
    assert set(configs) == set(by_act) and all(c["n_runs"] == "1" for c in configs.values())
    assert configs["sigmoid"]["grad_health"] == "vanishing 1/1"
    assert float(configs["relu"]["test_acc_median"]) == float(by_act["relu"]["test/acc"])
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("| configuration | runs | finished | grad_health | test acc")
    assert any(line.startswith("| model.activation=sigmoid | 1 | 1 | vanishing 1/1 |") for line in md)
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {f"report/{f}" for f in FILES}
    assert f"logged to run {parent} under report/" in capsys.readouterr().out


def test_report_by_study_name_with_the_console_script(sweep, tmp_path):
    store, parent, _, _ = sweep
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([str(GRADSWEEP), "report", "mlp_vanishing", "--tracking-uri", store, "--out",
                          str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"logged to run {parent} under report/" in res.stdout
    assert {p.name for p in (tmp_path / "r").iterdir()} == FILES


def test_report_by_experiment_name_creates_a_report_run(sweep, tmp_path):
    store, parent, _, _ = sweep
    assert gradsweep(["report", "gradsweep", "--tracking-uri", store, "--out", str(tmp_path / "e")]) == 0
    rows = read_csv(tmp_path / "e" / "runs.csv")
    assert len(rows) == 3  # the training runs only: no sweep parent, no report run
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    reports = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("gradsweep.role") == "report"]
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert "report/summary.md" in {a.path for a in client.list_artifacts(reports[0].info.run_id, "report")}


def test_report_of_a_single_run(sweep, tmp_path):
    store, parent, _, _ = sweep
    client = MlflowClient(store)
    child = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")[0]
    assert gradsweep(["report", child.info.run_id, "--tracking-uri", store, "--out", str(tmp_path / "one")]) == 0
    (row,) = read_csv(tmp_path / "one" / "runs.csv")
    assert row["run_id"] == child.info.run_id and row["grad_health"] == child.data.tags["grad_health"]
    assert "report/summary.csv" in {a.path for a in client.list_artifacts(child.info.run_id, "report")}


@pytest.mark.parametrize("ref,message", [
    ("no_such_thing", "'no_such_thing' is not a run id, study or experiment in sqlite:///"),
    ("0123456789abcdef0123456789abcdef", "run '0123456789abcdef0123456789abcdef' not found in sqlite:///"),
    ("zero_init", "study 'zero_init' has no sweep with runs in sqlite:///"),
])
def test_unknown_reference_is_one_line(sweep, tmp_path, capsys, ref, message):
    store = sweep[0]
    assert gradsweep(["report", ref, "--tracking-uri", store, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    if ref == "no_such_thing":  # names what is allowed
        assert "circles_activations|clip_rescue|clip_value_vs_norm|dead_relu" in err[0]
        assert "an experiment (Default|gradsweep)" in err[0]
    assert not (tmp_path / "x").exists()


def test_missing_store_is_one_line_and_creates_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    res = subprocess.run([str(GRADSWEEP), "report", "srn_explosion"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: --tracking-uri='sqlite:///mlruns/mlflow.db': no tracking store at ")
    assert not (tmp_path / "mlruns").exists()


def test_report_against_real_server(tmp_path, mlflow_server, monkeypatch):
    """zero_init (3 runs with per-epoch statistics) through a real server; the report finds the
    server from MLFLOW_TRACKING_URI, as the trainer does, and its files land in the server's
    artifact store."""
    res = run_train(["-m", "experiment=zero_init", "trainer.epochs=5", "tracking.log_figures=false",
                     f"tracking.uri={mlflow_server.uri}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert gradsweep(["report", "zero_init", "--out", str(tmp_path / "rep")]) == 0
    assert {p.name for p in (tmp_path / "rep").iterdir()} == FILES | {"epoch_stats.png"}
    rows = read_csv(tmp_path / "rep" / "runs.csv")
    assert sorted(r["model.activation"] for r in rows) == ["relu", "sigmoid", "tanh"]
    assert all(float(r["health/hidden_unit_spread"]) < 1e-6 for r in rows)  # symmetric units stay identical
    (parent,) = parents(MlflowClient(mlflow_server.uri))
    assert {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(parent.info.run_id, "report")} == \
        {f"report/{f}" for f in FILES | {"epoch_stats.png"}}
    assert list((tmp_path / "artifacts").rglob("report/epoch_stats.png"))
