"""Optuna sweeps through Hydra (``+sweep=<name>``, ``hydra/sweeper=gradsweep_optuna``), end to end.

Real components throughout: ``src/train.py -m`` in a subprocess, Optuna studies in sqlite or a real
PostgreSQL server, the embedded MLflow store read back with MlflowClient.
"""
from __future__ import annotations

import csv
import math
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import TRAIN, run_train
from gradsweep.labels import trial_label
from postgres import postgres_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

FIGURES = {"optimization_history", "param_importances", "parallel_coordinate", "slice"}
TINY = ["trainer.epochs=2"]  # 20 steps of the MLP on two-moons, 10 of the SRN on digit-sum
LEAN = ["hydra.sweeper.figures=false", "tracking.log_figures=false", "tracking.log_checkpoints=false"]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One embedded MLflow store for this module (its tables are created once, not per test);
    each test logs to its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture
def store(shared_store, request) -> list[str]:
    """The tracking overrides of one test: the shared store, an experiment named after the test."""
    return [f"tracking.uri={shared_store}", f"tracking.experiment_name={request.node.name}"]


def optuna_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"


def runs_of(store: list[str]):
    client = MlflowClient(store[0].split("=", 1)[1])
    exp = client.get_experiment_by_name(store[1].split("=", 1)[1])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# ------------------------------------------------------------------------ in-process checks
def test_named_sweeps_compose_with_the_optuna_sweeper(hydra_compose):
    expected = {
        "lr_layers_clip": {"optimizer.lr": "tag(log, interval(0.001, 1.0))", "model.num_layers": "int(interval(1, 3))",
                           "clip.max_norm": "tag(log, interval(0.1, 100.0))"},
        "mlp_depth_lr": {"model.num_layers": "int(interval(1, 5))", "optimizer.lr": "tag(log, interval(0.01, 5.0))",
                         "model.activation": "choice(sigmoid, tanh, relu)"},
        "clip_only": None,
    }
    for name, params in expected.items():
        cfg = hydra_compose([f"+sweep={name}"])
        sw = cfg.hydra.sweeper
        assert sw._target_ == "gradsweep.sweep.optuna_sweeper.GradsweepOptunaSweeper"
        assert sw.study_name == name and sw.storage == "sqlite:///mlruns/optuna.db"
        assert str(sw.direction) in ("maximize", "Direction.maximize") and sw.n_trials >= 20
        assert sw.sampler._target_ == "optuna.samplers.TPESampler" and sw.sampler.seed == 0
        assert sw.pruner._target_ == "optuna.pruners.MedianPruner"
        assert (dict(sw.params) if sw.params else None) == params
    assert hydra_compose(["+sweep=mlp_depth_lr"]).model.name == "mlp"
    assert hydra_compose(["+sweep=mlp_depth_lr"]).data.name == "moons"
    assert hydra_compose(["+sweep=clip_only"]).hydra.sweeper.custom_search_space == \
        "gradsweep.sweep.search_spaces.clip_norm_or_none"
    for pruner, target in (("none", "NopPruner"), ("hyperband", "HyperbandPruner")):
        cfg = hydra_compose(["+sweep=lr_layers_clip", f"hydra/sweeper/pruner={pruner}"])
        assert cfg.hydra.sweeper.pruner._target_ == f"optuna.pruners.{target}"


def test_unknown_sweep_is_a_one_line_error(tmp_path):
    res = run_train(["-m", "+sweep=nope"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: sweep=nope: unknown option; allowed: clip_methods|clip_only|lr_layers_clip|mlp_depth_lr"]
    assert not (tmp_path / "multirun").exists()


def test_clip_only_space_is_conditional():
    from gradsweep.sweep.search_spaces import clip_norm_or_none

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        clip_norm_or_none(None, trial)
        study.tell(trial, 0.0)
    kinds = {t.params["clip"] for t in study.trials}
    assert kinds == {"norm", "none"}
    for t in study.trials:
        if t.params["clip"] == "none":
            assert set(t.params) == {"clip"}
        else:
            assert 0.1 <= t.params["clip.max_norm"] <= 100.0


def test_storage_urls(tmp_path, monkeypatch):
    from gradsweep.sweep.optuna_loop import make_storage, resolve_storage_url

    monkeypatch.chdir(tmp_path)
    assert resolve_storage_url("sqlite:///mlruns/optuna.db") == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert (tmp_path / "mlruns").is_dir()
    assert resolve_storage_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_storage_url(None) is None
    journal = resolve_storage_url("journal:studies/optuna.log")
    assert journal == f"journal:{tmp_path}/studies/optuna.log"
    # psycopg (3) is SQLAlchemy 2's default PostgreSQL driver; with only psycopg2 installed we name it
    pg = resolve_storage_url("postgresql://u:p@db:5432/optuna")
    assert pg in ("postgresql://u:p@db:5432/optuna", "postgresql+psycopg2://u:p@db:5432/optuna")
    # a journal file is a real storage: two studies, continued by a second storage object
    for _ in range(2):
        study = optuna.create_study(study_name="j", storage=make_storage(journal), load_if_exists=True)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert [t.number for t in optuna.load_study(study_name="j", storage=make_storage(journal)).trials] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- end to end
def test_study_end_to_end_then_continued(tmp_path, store):
    """mlp_depth_lr, 3 trials then 2 more: one study, numbers 0-4, one MLflow child per trial."""
    args = ["-m", "+sweep=mlp_depth_lr", *TINY, "optimizer.lr=tag(log, interval(0.01, 0.5))",
            "tracking.log_figures=false", "tracking.log_checkpoints=false", "hydra.sweeper.n_trials=3", *store]
    ok(run_train(args, tmp_path))
    study = optuna.load_study(study_name="mlp_depth_lr", storage=optuna_db(tmp_path))
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    client, parents, children = runs_of(store)
    assert len(parents) == 1 and len(children) == 3
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    assert sorted(by_number) == [0, 1, 2]
    for t in study.trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["optuna.study_name"] == "mlp_depth_lr"
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert math.isclose(float(run.data.params["optimizer.lr"]), t.params["optimizer.lr"], rel_tol=1e-9)
        assert run.data.params["model.num_layers"] == str(t.params["model.num_layers"])
        assert run.data.params["model.activation"] == t.params["model.activation"]
        assert t.value == run.data.metrics["best/dev_acc"]
        assert len(t.intermediate_values) == len(client.get_metric_history(run.info.run_id, "dev/acc")) == 1
    assert study.best_value == max(c.data.metrics["best/dev_acc"] for c in children)

    parent = parents[0]
    assert parent.data.metrics["optuna/best_value"] == study.best_value
    assert parent.data.metrics["optuna/trials"] == 3 and parent.data.metrics["optuna/complete"] == 3
    assert parent.data.tags["optuna.best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]
    for k, v in study.best_params.items():
        assert parent.data.params[f"best.{k}"] == str(v)
    arts = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {f"{f}.png" for f in FIGURES} | {"trials.csv"} <= arts
    rows = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "optuna/trials.csv", str(tmp_path)))))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE"), ("2", "COMPLETE")]

    # the same command again continues the study: numbers go on, new children only, new job folders
    ok(run_train([*args[:-3], "hydra.sweeper.n_trials=2", "hydra.sweeper.figures=false", *store], tmp_path))
    study = optuna.load_study(study_name="mlp_depth_lr", storage=optuna_db(tmp_path))
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 5  # no replayed draws
    client, parents, children = runs_of(store)
    assert len(parents) == 2
    numbers = sorted(int(c.data.tags["optuna.trial_number"]) for c in children)
    assert numbers == [0, 1, 2, 3, 4]
    second = max(parents, key=lambda r: r.info.start_time)
    assert second.data.metrics["optuna/trials"] == 5 and second.data.metrics["optuna/trials_this_sweep"] == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children if int(c.data.tags["optuna.trial_number"]) >= 3} \
        == {second.info.run_id}
    job_dirs = sorted(p.name for p in (tmp_path / "multirun").glob("*/*/[0-9]*"))
    assert job_dirs == ["0", "1", "2", "3", "4"]  # numbered by trial: nothing overwritten


def test_pruning_stops_hopeless_trials(tmp_path, store):
    """lr 1e-6 cannot learn two-moons in 30 steps; the median pruner stops those trials early."""
    res = run_train(["-m", "model=mlp", "data=moons", "trainer.reduction=mean", "trainer.epochs=3",
                     "trainer.eval_every_steps=3", "hydra/sweeper=gradsweep_optuna", "hydra/sweeper/sampler=random",
                     "hydra.sweeper.sampler.seed=0", "hydra.sweeper.study_name=prune", "hydra.sweeper.n_trials=6",
                     "hydra.sweeper.pruner.n_startup_trials=1", "optimizer.lr=choice(0.5, 0.000001)",
                     *LEAN, *store], tmp_path)
    ok(res)
    study = optuna.load_study(study_name="prune", storage=optuna_db(tmp_path))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(pruned) >= 1 and len(complete) >= 1 and len(pruned) + len(complete) == 6
    assert all(t.params["optimizer.lr"] == 0.000001 for t in pruned)
    client, _, children = runs_of(store)
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    full = len(client.get_metric_history(by_number[complete[0].number].info.run_id, "dev/acc"))
    assert full == 10
    for t in pruned:  # FINISHED (MLflow draws KILLED as a failure), named and tagged as pruned
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.info.run_name == f"{trial_label(t.number, t.params)} (pruned)"
        assert run.data.tags["optuna.state"] == "PRUNED" and run.data.tags["gradsweep.stopped"] == "pruned"
        evals = client.get_metric_history(run.info.run_id, "dev/acc")
        assert len(evals) == len(t.intermediate_values) < full
        assert int(run.data.tags["gradsweep.stopped_step"]) == max(t.intermediate_values)
        assert "best/dev_acc" not in run.data.metrics  # it never finished
    assert "Error executing job" not in res.stderr  # pruning is not reported as a job error
    for t in complete:
        assert by_number[t.number].info.run_name == trial_label(t.number, t.params)
    names = [c.info.run_name for c in children]
    assert len(set(names)) == 6 and max(map(len, names)) <= 40  # short, and no two alike
    # the console: one short line per trial, none with the job's sweep context (base64) or all its overrides
    console = (res.stdout + res.stderr).splitlines()
    announced = [line.split("] ", 1)[-1] for line in console if re.search(r"\] trial \d+: ", line)]
    assert announced == [trial_label(t.number, t.params) for t in study.trials]
    assert all(len(line) <= 60 for line in announced)
    assert not [line for line in console if "GRADSWEEP_SWEEP" in line or re.search(r"[A-Za-z0-9_-]{60}", line)]
    assert not [line for line in console if re.search(r"#\d+ : |Launching \d+ jobs", line)]


def test_diverging_trial_fails_and_the_study_goes_on(tmp_path, store):
    common = ["-m", "model=mlp", "data=moons", "clip=none", "trainer.batch_size=0", "trainer.epochs=3",
              "hydra/sweeper=gradsweep_optuna", "hydra/sweeper/sampler=grid", "hydra/sweeper/pruner=none",
              "optimizer.lr=choice(1000000.0, 0.1, 0.05)", *LEAN, *store]
    ok(run_train([*common, "hydra.sweeper.study_name=diverge", "hydra.sweeper.max_failure_rate=0.5"], tmp_path))
    study = optuna.load_study(study_name="diverge", storage=optuna_db(tmp_path))
    states = {t.params["optimizer.lr"]: t for t in study.trials}
    assert sorted(states) == [0.05, 0.1, 1000000.0]
    bad = states[1000000.0]
    assert bad.state == TrialState.FAIL and "NaN" in bad.user_attrs["gradsweep_failure"]
    assert states[0.1].state == states[0.05].state == TrialState.COMPLETE
    client, _, children = runs_of(store)
    run = {int(c.data.tags["optuna.trial_number"]): c for c in children}[bad.number]
    assert run.info.status == "FAILED" and run.data.tags["failure"] == "nonfinite_loss"
    assert run.data.tags["optuna.state"] == "FAIL"
    assert sorted(c.data.tags["optuna.state"] for c in children) == ["COMPLETE", "COMPLETE", "FAIL"]

    # max_failure_rate=0: the first failure stops the sweep with one line; nothing is left RUNNING
    res = run_train([*common, "hydra.sweeper.study_name=strict", "hydra.sweeper.max_failure_rate=0"], tmp_path)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 trials failed, more than hydra.sweeper.max_failure_rate=0.0 allows (0)")
    strict = optuna.load_study(study_name="strict", storage=optuna_db(tmp_path)).trials
    assert [t.state for t in strict][-1] == TrialState.FAIL
    assert all(t.state == TrialState.COMPLETE for t in strict[:-1])


def test_sweep_killed_while_asking_leaves_no_trial_running(tmp_path, store):
    """SIGKILL while a sweep asks a big batch (the issue's n_jobs=5000, with no job started yet): the
    next invocation of the study fails the dead sweep's trials by their heartbeats, with the reason,
    and none stays RUNNING. Heartbeats, not process ids: it holds for a sweep on another machine.
    (A trial killed before its first beat is failed by the same call: it lacks the live sweep's mark.)"""
    args = ["-m", "+sweep=clip_only", *TINY, *LEAN, "hydra.sweeper.heartbeat_interval=1",
            "hydra.sweeper.grace_period=2", *store]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args, "hydra.sweeper.n_trials=1000",
                             "hydra.sweeper.n_jobs=1000"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db, asked = tmp_path / "mlruns" / "optuna.db", 0
    deadline = time.monotonic() + 120
    while asked < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                asked = con.execute("select count(*) from trials").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            pass
    proc.kill()
    proc.wait(30)
    assert asked >= 5, "the sweep never asked its trials"
    trials = optuna.load_study(study_name="clip_only", storage=optuna_db(tmp_path)).trials
    dead = {t.number for t in trials if t.state == TrialState.RUNNING}
    assert dead and len(dead) == len(trials)  # left RUNNING by the kill
    time.sleep(3)  # past the grace period
    from gradsweep.sweep.optuna_stale import fail_stale
    from gradsweep.sweep.optuna_storage import make_storage, resolve_storage_url

    # what the next invocation of the study does first, from any host (a whole rerun: test_schedule.py)
    storage = make_storage(resolve_storage_url(optuna_db(tmp_path)), heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="clip_only", storage=storage)
    failed = dict(fail_stale(study, storage))
    assert set(failed) == dead and all("heartbeat" in why for why in failed.values())
    trials = optuna.load_study(study_name="clip_only", storage=optuna_db(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * len(dead)
    assert all("heartbeat" in t.user_attrs["gradsweep_failure"] for t in trials)  # the reason, in Optuna


def test_two_workers_share_one_postgres_study(tmp_path, store, postgres_server):  # noqa: F811
    """Two independent `-m` processes on one PostgreSQL study: 3 + 3 trials, numbers 0-5, no duplicates."""
    env = {"OMP_NUM_THREADS": "1"}  # two workers on a 2-core machine
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONUNBUFFERED": "1", **env})
    workers = [subprocess.Popen(
        [sys.executable, str(TRAIN), "-m", "+sweep=lr_layers_clip", *TINY, "hydra.sweeper.n_trials=3",
         f"hydra.sweeper.storage={postgres_server.uri}", "hydra.sweeper.study_name=shared",
         f"hydra.sweep.dir=multirun/worker{i}", *LEAN, *store],
        cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
    from gradsweep.sweep.optuna_loop import make_storage, resolve_storage_url

    study = optuna.load_study(study_name="shared", storage=make_storage(resolve_storage_url(postgres_server.uri)))
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state.is_finished() for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # the workers did not draw the same values
    per_worker = {}
    for t in trials:
        per_worker.setdefault(t.user_attrs["gradsweep_sweep_id"], []).append(t.number)
    assert sorted(len(v) for v in per_worker.values()) == [3, 3]
    _, parents, children = runs_of(store)
    assert len(parents) == 2 and len(children) == 6
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(6))
    assert {c.data.tags["optuna.state"] for c in children} <= {"COMPLETE", "PRUNED", "FAIL"}


@pytest.mark.slow  # ~1 min: two loky worker processes each import torch, MLflow and Hydra
def test_joblib_launcher_runs_trials_concurrently(tmp_path, store):
    """hydra/launcher=joblib with n_jobs=2: trials run two at a time in worker processes and still
    report to their trial (through the storage) and land in MLflow under the sweep."""
    ok(run_train(["-m", "+sweep=lr_layers_clip", *TINY, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                  "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "trainer.eval_every_steps=2",
                  *LEAN, *store], tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"}))
    study = optuna.load_study(study_name="lr_layers_clip", storage=optuna_db(tmp_path))
    trials = study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.is_finished() for t in trials)
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # reported from the worker processes
    first, second = trials[0], trials[1]
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    _, parents, children = runs_of(store)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
