"""A real `-m` sweep in a subprocess, read back with MlflowClient (embedded store and real server)."""
import csv
import json
import re
import time
from pathlib import Path
from urllib.parse import unquote

import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

import gradsweep
from conftest import run_train
from gradsweep.track.tracker import Tracker
from proxy import FaultProxy

import pytest

pytestmark = pytest.mark.integration

PARAMS = ["embedding.weight", "rnn.W", "rnn.U", "rnn.b", "classifier.weight", "classifier.bias"]
STEPS = 10  # 2 epochs x ceil(300 / 64)


def check_sweep(uri: str, tmp_path: Path):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["gradsweep.sweep_id"] for c in children} == {parent.data.tags["gradsweep.sweep_id"]}
    assert sorted(float(c.data.params["clip.max_norm"]) for c in children) == [1.0, 5.0, 20.0]
    for c in children:
        assert c.info.status == "FINISHED"
        max_norm = float(c.data.params["clip.max_norm"])
        assert c.data.params["model.hidden_size"] == "32" and c.data.params["optimizer.lr"] == "0.2"
        assert "clip.max_norm=" in c.data.tags["gradsweep.overrides"]
        # the name says what the child varies; the sweep's constant overrides (epochs, store) are left out
        varied = c.data.tags['gradsweep.overrides'].split('clip.max_norm=')[1].split()[0]
        assert c.info.run_name == f"clip.max_norm={varied}"
        total = client.get_metric_history(c.info.run_id, "grad_norm/total")
        clipped = client.get_metric_history(c.info.run_id, "grad_norm/total_clipped")
        assert sorted(m.step for m in total) == list(range(STEPS))
        assert all(m.value <= max_norm * (1 + 1e-6) for m in clipped)
        for p in PARAMS:
            history = client.get_metric_history(c.info.run_id, f"grad_norm/{p}")
            assert sorted(m.step for m in history) == list(range(STEPS))
        assert [m.step for m in client.get_metric_history(c.info.run_id, "dev/acc")] == [STEPS - 1]
        assert 0 <= c.data.metrics["best/dev_acc"] <= 1 and "test/acc" in c.data.metrics
        arts = {a.path for a in client.list_artifacts(c.info.run_id, "checkpoints")}
        assert arts == {"checkpoints/best.pt", "checkpoints/last.pt"}
        assert {a.path for a in client.list_artifacts(c.info.run_id, "figures")} == {"figures/grad_norms.png"}
        local = client.download_artifacts(c.info.run_id, "checkpoints/last.pt", str(tmp_path))
        state = torch.load(local, weights_only=True)
        assert state["step"] == STEPS and set(state) >= {"model", "optimizer", "best_score", "config"}
        assert state["config"]["clip"]["max_norm"] == max_norm and "rnn.U" in state["model"]
    sweep_arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert sweep_arts == {f"sweep/{f}" for f in ("grad_norm_total.png", "summary.md", "summary.csv", "runs.csv")}
    csv_path = client.download_artifacts(parent.info.run_id, "sweep/runs.csv", str(tmp_path))
    rows = Path(csv_path).read_text().splitlines()
    assert len(rows) == 4 and "clip.max_norm" in rows[0] and "best/dev_acc" in rows[0]
    summary = list(csv.DictReader(Path(client.download_artifacts(parent.info.run_id, "sweep/summary.csv",
                                                                 str(tmp_path))).open()))
    assert sorted(r["clip.max_norm"] for r in summary) == ["1.0", "20.0", "5.0"]
    assert all(r["n_runs"] == "1" and r["n_finished"] == "1" for r in summary)


def test_multirun_embedded_store(tmp_path, store, monkeypatch, capsys):
    res = run_train(["-m", "clip.max_norm=1,5,20", "trainer.epochs=2", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in res.stdout
    check_sweep(store, tmp_path)
    # the printed UI command runs as printed (an absolute path to this environment's mlflow), and the
    # links open the runs view and the comparison of exactly the sweep's children
    (command,) = [ln.strip() for ln in res.stdout.splitlines() if " ui --backend-store-uri " in ln]
    assert Path(command.split()[0]).is_file() and command.endswith(store.replace("sqlite:///", "sqlite:///"))
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    children = {r.info.run_id for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags}
    (runs_link,) = [ln.split()[-1] for ln in res.stdout.splitlines() if ln.strip().startswith("runs:")]
    (compare,) = [ln.split()[-1] for ln in res.stdout.splitlines() if ln.strip().startswith("comparison:")]
    assert runs_link == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    ids = json.loads(unquote(compare.split("runs=")[1].split("&")[0]))
    assert set(ids) == children and compare.endswith("workflowType=machine_learning")
    # the parent's description links the same comparison and the charts of its children
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    note = parent.data.tags["mlflow.note.content"]
    assert compare.removeprefix("http://127.0.0.1:5000/") in note and "grad_norm/total of every run" in note
    for c in children:  # every step of each child in its dense history
        assert list(gradsweep.history(c, tracking_uri=store).index) == list(range(STEPS))
    # the delivered runs leave nothing in the spool once the sweep's delivery process has ended
    spool = Path(store.removeprefix("sqlite:///")).parent / "spool"
    deadline = time.monotonic() + 30
    while [p for p in spool.iterdir() if p.is_dir()] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [p.name for p in spool.iterdir() if p.is_dir()] == []
    _one_copy_then_gc(store, tmp_path, monkeypatch, capsys)


def _one_copy_then_gc(store: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """Each checkpoint and figure is kept once, in the store (tracking.keep_local_artifacts=false).
    `gradsweep gc` lists without removing, then removes exactly the folders whose runs are FINISHED
    with everything in the store; a folder a live job holds, a RUNNING run's and a spooled run's stay."""
    from gradsweep.cli.main import main
    from gradsweep.locks import FOLDER_LOCK, hold, release
    from gradsweep.names import OUTPUT_DIR_TAG
    from gradsweep.track.journal import RunJournal, now_ms

    mlruns = tmp_path / "mlruns"

    def files(pattern: str) -> list[Path]:  # what the sweep wrote (check_sweep downloads beside them)
        return [p for root in ("mlruns", "multirun", "outputs") for p in (tmp_path / root).rglob(pattern)]
    for pattern, n in (("*.pt", 6), ("grad_norms.png", 3), ("grad_norm_total.png", 1)):  # children's; parent's
        found = files(pattern)
        assert len(found) == n and all(mlruns / "artifacts" in p.parents for p in found), found
    (sweep,) = tmp_path.glob("multirun/*/*")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    running, spooled = (tmp_path / "outputs" / name for name in ("running", "spooled"))
    for folder in (running, spooled):
        (folder / ".hydra").mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"only here")
    client.create_run(exp.experiment_id, tags={OUTPUT_DIR_TAG: str(running.resolve())})  # RUNNING
    journal = RunJournal.create(mlruns / "spool", {  # a live writer (this process), not delivered
        "uri": store, "experiment_name": "gradsweep",
        "create": {"run_name": "spooled", "tags": {OUTPUT_DIR_TAG: str(spooled.resolve())}, "start_time": now_ms()}})
    held = hold(sweep / "1" / FOLDER_LOCK)  # a job still writing its folder
    monkeypatch.chdir(tmp_path)
    try:
        before = sorted(tmp_path.rglob("*"))
        assert main(["gc"]) == 0
        out = capsys.readouterr().out
        assert sorted(tmp_path.rglob("*")) == before, out  # a dry run removes nothing
        listed = {ln.split()[0] for ln in out.splitlines() if "folder; FINISHED in the store" in ln}
        assert listed == {str((sweep / n).relative_to(tmp_path)) for n in ("0", "2")}, out
        assert main(["gc", "--yes"]) == 0
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["1"], capsys.readouterr().out
        for folder in (running, spooled):
            assert (folder / "last.pt").read_bytes() == b"only here"
        assert journal.folder.is_dir()
        release(held)
        assert main(["gc", "--yes"]) == 0  # the job has ended: its sweep goes as a whole, the day's folder too
        assert list((tmp_path / "multirun").iterdir()) == [], capsys.readouterr().out
    finally:
        release(held)
        journal.close()
    assert len(files("*.pt")) == 6 + 2  # the store's copies, and the two folders that stay


def _duplicates_closed(client, experiment_id: str, kept: set[str]) -> None:
    """Every run beside ``kept`` is a duplicate a lost answer made: deleted, KILLED, naming a kept run."""
    every = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=100)
    for run in every:
        if run.info.run_id not in kept:
            assert run.info.lifecycle_stage == "deleted" and run.info.status == "KILLED"
            assert run.data.tags["gradsweep.duplicate_of"] in kept


def _single_job_through_a_slow_server(tmp_path, server):
    """The server creates the job's run but answers past the client's timeout: one run, FINISHED,
    every value once (in an experiment of its own, beside the sweep's)."""
    with FaultProxy(server.uri, {"runs/create": {1: 4.0}}) as proxy:
        res = run_train(["trainer.epochs=2", f"tracking.uri={proxy.uri}", "tracking.experiment_name=single"],
                        tmp_path, env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert proxy.lost == [("runs/create", 1)]
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("single")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("grad_norm/total", "train/loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(STEPS))
    assert list(gradsweep.history(run.info.run_id, tracking_uri=server.uri).index) == list(range(STEPS))
    _duplicates_closed(client, exp.experiment_id, {run.info.run_id})


def test_multirun_against_real_server(tmp_path, mlflow_server):
    """Through a proxy that loses answers the server gave: the experiment's create, the sweep parent's
    create and MLflow's own re-send of it (so the next delivery pass tries again), and the first
    child's create: still one parent, one run per job, and every duplicate closed. A single job
    through a slow server first, on the same server (one server start for both)."""
    _single_job_through_a_slow_server(tmp_path, mlflow_server)
    lose = {"experiments/create": {1: 0.0}, "runs/create": {1: 0.0, 2: 0.0, 3: 0.0}}
    with FaultProxy(mlflow_server.uri, lose) as proxy:
        res = run_train(["-m", "clip.max_norm=1,5,20", "trainer.epochs=2", f"tracking.uri={proxy.uri}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(proxy.lost) == 4  # every fault happened
    check_sweep(mlflow_server.uri, tmp_path)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["sweep/runs"] == 3
    (compare,) = [unquote(ln.split()[-1]) for ln in res.stdout.splitlines() if ln.strip().startswith("comparison:")]
    assert set(compare.split("runs=[")[1].split("]")[0].replace('"', "").split(",")) == \
        {r.info.run_id for r in runs} - {parent.info.run_id}
    _duplicates_closed(client, exp.experiment_id, {r.info.run_id for r in runs})
    # MLflow's own HTTP retry re-sends a create whose answer was lost, inside one call (as in a process
    # that creates runs itself, e.g. an Optuna sweep's): two runs, one kept, the other closed
    with FaultProxy(mlflow_server.uri, {"runs/create": {1: 0.0}}) as proxy:
        kept = Tracker(proxy.uri, "direct").start_run("direct", {})
    assert proxy.seen["runs/create"] == 2
    direct = client.get_experiment_by_name("direct").experiment_id
    assert [r.info.run_id for r in client.search_runs([direct])] == [kept]
    assert len(client.search_runs([direct], run_view_type=ViewType.ALL)) == 2
    _duplicates_closed(client, direct, {kept})
    # artifacts went through the server into its artifact destination, not the client's disk
    assert list((tmp_path / "artifacts").rglob("last.pt"))


def test_diverging_job_fails_and_sweep_goes_on(tmp_path, store):
    res = run_train(["-m", "model=mlp", "data=moons", "model.activation=relu", "optimizer.lr=1e6,0.1",
                     "trainer.epochs=3", "trainer.batch_size=0", "clip=none", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    children = [r for r in client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    by_lr = {r.data.params["optimizer.lr"]: r for r in children}
    bad, good = by_lr["1000000.0"], by_lr["0.1"]
    assert bad.info.status == "FAILED"
    assert bad.data.tags["failure"] == "nonfinite_loss" and int(bad.data.tags["failure_step"]) >= 0
    assert good.info.status == "FINISHED" and "best/dev_acc" in good.data.metrics


def test_single_diverging_run_exits_nonzero(tmp_path, store):
    res = run_train(["model=mlp", "data=moons", "optimizer.lr=1e6", "trainer.epochs=3", "trainer.batch_size=0",
                     "clip=none", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: training diverged: non-finite loss at step")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    assert run.info.status == "FAILED"


def test_passwords_are_refused_in_uris_and_taken_from_the_environment(tmp_path, mlflow_server):
    """A password in a URI would land in .hydra/*.yaml, multirun.yaml and the run journal: refused in
    one line before anything is written. From the environment it works and is written nowhere."""
    secret = "s3cret-pw"
    uri = mlflow_server.uri.replace("http://", f"http://alice:{secret}@")
    for args in (["trainer.epochs=1", f"tracking.uri={uri}"],
                 ["-m", "trainer.epochs=1", "hydra.sweeper.storage=postgresql://u:s3cret-pw@db/optuna",
                  f"tracking.uri={mlflow_server.uri}"]):
        res = run_train(args, tmp_path)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and "holds a password" in lines[0], res.stderr[-2000:]
        assert "MLFLOW_TRACKING_PASSWORD" in lines[0] and secret not in res.stdout + res.stderr
    token_uri = f"{mlflow_server.uri}/?access_token={secret}"  # a credential in the query string is one too
    res = run_train(["trainer.epochs=1"], tmp_path, env={"MLFLOW_TRACKING_URI": token_uri})
    assert res.returncode == 2 and "holds a credential in its query string (access_token)" in res.stderr, res.stderr
    assert secret not in res.stdout + res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name in ("outputs", "multirun", "mlruns")]
    res = run_train(["trainer.epochs=1", f"tracking.uri=http://alice@{mlflow_server.uri.split('://')[1]}"], tmp_path,
                    env={"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": secret})
    assert res.returncode == 0, res.stderr[-3000:]
    assert secret not in res.stdout + res.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not written
    client = MlflowClient(mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    assert run.info.status == "FINISHED"
    assert not [v for v in [*run.data.params.values(), *run.data.tags.values()] if secret in v]


def test_seeds_are_grouped_into_configurations(tmp_path, store):
    """`trainer.seed=range(0,3)` with any sweep: the parent's summary has one row per configuration
    with n_runs and the median/min/max over its seeds; the figure draws a median and a band."""
    res = run_train(["-m", "clip.max_norm=1,20", "trainer.seed=range(0,3)", "trainer.epochs=1",
                     "tracking.log_checkpoints=false", "tracking.log_figures=false", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("gradsweep.role") == "sweep"]
    rows = list(csv.DictReader(Path(client.download_artifacts(parent.info.run_id, "sweep/summary.csv",
                                                              str(tmp_path))).open()))
    assert sorted(r["clip.max_norm"] for r in rows) == ["1.0", "20.0"] and "trainer.seed" not in rows[0]
    runs = list(csv.DictReader(Path(client.download_artifacts(parent.info.run_id, "sweep/runs.csv",
                                                              str(tmp_path))).open()))
    assert sorted(r["trainer.seed"] for r in runs) == ["0", "0", "1", "1", "2", "2"]
    for row in rows:
        assert row["n_runs"] == "3" and row["n_finished"] == "3"
        accs = sorted(float(r["test/acc"]) for r in runs if r["clip.max_norm"] == row["clip.max_norm"])
        assert float(row["test_acc_min"]) == accs[0] and float(row["test_acc_max"]) == accs[-1]
        assert float(row["test_acc_median"]) == accs[1]
    md = Path(client.download_artifacts(parent.info.run_id, "sweep/summary.md", str(tmp_path))).read_text()
    assert "| clip.max_norm=1.0 | 3 | 3 |" in md and "median [min-max]" in md
    # the sweep ends with the same numbers on the console: one row per configuration
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Sweep summary (2 configurations, median"))
    table = {line.split()[0]: line for line in lines[head + 3:head + 5]}
    assert set(table) == {"clip.max_norm=1", "clip.max_norm=20"}, lines[head:head + 6]  # as the user typed them
    for row in rows:
        line = table[f"clip.max_norm={float(row['clip.max_norm']):.3g}"]
        cells = [c for c in line.split("  ") if c.strip()]
        assert cells[1].strip() == "3/3" and f"{float(row['test_acc_median']):.4g} [" in cells[-1], line
    # a run is called by its name from its first console line to its last, with its short id once it has one
    log = res.stdout + res.stderr
    assert not re.search(r"- run [0-9a-f]{32}", log)
    # (the id once the store has the run: its create goes through the delivery process, which a loaded
    # machine can delay past a 5-step run's end)
    ends = re.findall(r"- run (clip\.max_norm=\S+ trainer\.seed=\d)(?: \(([0-9a-f]{8})\))? FINISHED: best dev acc", log)
    starts = re.findall(r"- run (clip\.max_norm=\S+ trainer\.seed=\d)(?: \([0-9a-f]{8}\))? on cpu", log)
    assert len(ends) == 6 and sorted(name for name, _ in ends) == sorted(starts), log[-3000:]
    assert {short for _, short in ends if short} <= {r["run_id"][:8] for r in runs}
