"""Sweeps on a real Slurm cluster through Hydra's submitit launcher (``hydra/launcher=slurm``).

Real components throughout: the single-node cluster of ``deploy/slurm/start.sh`` (Debian's
slurmctld, slurmd and munge, the sacct stand-in of ``deploy/slurm/bin`` on PATH), a real
``mlflow server`` on a real PostgreSQL (tests/postgres.py), Optuna's study in a second database of
that PostgreSQL, ``src/train.py -m`` as a user runs it, and ``scancel`` on a job mid-run.
The module is skipped, with the reason, where the cluster cannot be started (not root, no apt-get).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import psycopg2
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import gradsweep
from conftest import ROOT, MlflowServer, run_train
from gradsweep.locks import parse_owner
from gradsweep.names import PARENT_TAG, WORKER_TAG
from gradsweep.sweep.optuna_storage import make_storage, resolve_storage_url
from postgres import PostgresServer

# the cluster tier: a cluster started and a package install, so not in the default run (`pytest -m cluster`,
# `make test-cluster`); the default run stays within CI's budget
pytestmark = [pytest.mark.integration, pytest.mark.cluster]

DEPLOY = ROOT / "deploy" / "slurm"
SLURM_DIR = Path(os.environ.get("GRADSWEEP_SLURM_DIR", "/tmp/gradsweep-slurm"))
STEPS_PER_EPOCH = 5  # digit-sum: ceil(300 / 64) optimizer steps
# jobs as short as they get: no figure, no checkpoints, one core, 1 GB (the node may be small)
LEAN = ["tracking.log_figures=false", "tracking.log_checkpoints=false", "hydra.launcher.mem_gb=1"]


# ------------------------------------------------------------------------------ fixtures
def _cluster_up() -> bool:
    conf = SLURM_DIR / "etc" / "slurm.conf"
    if not conf.is_file() or shutil.which("scontrol") is None:
        return False
    res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                         env={**os.environ, "SLURM_CONF": str(conf)})
    return "is UP" in res.stdout


@pytest.fixture(scope="module")
def slurm():
    """The cluster of deploy/slurm/start.sh; stopped at the end unless it was up before the module."""
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster needs root here (deploy/slurm/start.sh installs and starts its daemons)")
    if shutil.which("slurmctld", path="/usr/sbin:/usr/bin") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and there is no apt-get to install it")
    was_up = _cluster_up()
    t0 = time.monotonic()
    res = subprocess.run([str(DEPLOY / "start.sh")], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"the Slurm cluster did not start: {(res.stderr.strip() or res.stdout.strip()).splitlines()[-1]}")
    print(f"\nSlurm cluster up in {time.monotonic() - t0:.1f} s ({'already running' if was_up else 'started'})")
    env = {"SLURM_CONF": str(SLURM_DIR / "etc" / "slurm.conf"),
           "PATH": f"{DEPLOY / 'bin'}:{os.environ['PATH']}:/usr/sbin",  # the sacct stand-in first
           "OMP_NUM_THREADS": "1"}
    yield env
    if not was_up:
        subprocess.run([str(DEPLOY / "stop.sh")], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer(database="mlflow").start()
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE "optuna"')  # MLflow and Optuna both keep an alembic_version table
        conn.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_uri(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root, backend=f"postgresql+psycopg2://postgres@127.0.0.1:{postgres.port}/mlflow",
                          artifacts=str(root / "artifacts")).start()
    yield server.uri
    server.stop()


@pytest.fixture
def tracking(mlflow_uri, request) -> list[str]:
    return [f"tracking.uri={mlflow_uri}", f"tracking.experiment_name={request.node.name}"]


# ------------------------------------------------------------------------------ helpers
def runs(tracking: list[str]):
    client = MlflowClient(tracking[0].split("=", 1)[1])
    exp = client.get_experiment_by_name(tracking[1].split("=", 1)[1])
    found = client.search_runs([exp.experiment_id], max_results=100) if exp else []
    return client, [r for r in found if PARENT_TAG not in r.data.tags], [r for r in found if PARENT_TAG in r.data.tags]


def points(client: MlflowClient, run, key: str = "grad_norm/total") -> int:
    return len(client.get_metric_history(run.info.run_id, key))


def worker_pid(run) -> int:
    """The process writing a run (tag ``gradsweep.worker``: ``host:pid boot=... start=...``)."""
    return int(parse_owner(run.data.tags[WORKER_TAG])[1])


def slurm_job_of(pid: int) -> str:
    """The Slurm array task (``<array id>_<index>``) a process of a job runs in, from its environment."""
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
               if "=" in kv)
    return job_id(env)


def job_id(env: dict) -> str:
    """A Slurm job's id as submitit and scancel name it: ``<array id>_<index>`` for a task of an array
    (a sweep of several jobs), else the job's own id (submitit submits a one-job batch as a plain job)."""
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env \
        else env.get("SLURM_JOB_ID", "")


def cancel_when_training(tracking: list[str], where: str, slurm_env: dict, min_points: int = 30,
                         timeout_s: float = 120) -> dict:
    """Wait until the run matching ``where`` (an MLflow filter) has delivered ``min_points`` steps,
    then ``scancel`` its Slurm job; returns what was seen (run id, job, points at cancel time)."""
    client = MlflowClient(tracking[0].split("=", 1)[1])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(tracking[1].split("=", 1)[1])
        found = client.search_runs([exp.experiment_id], filter_string=where) if exp else []
        if found and found[0].info.status == "RUNNING" and points(client, found[0]) >= min_points:
            run = found[0]
            job = slurm_job_of(worker_pid(run))
            seen = {"run_id": run.info.run_id, "job": job, "points": points(client, run)}
            subprocess.run(["scancel", job], check=True, env={**os.environ, **slurm_env})
            return seen
        time.sleep(0.5)
    raise AssertionError(f"no run matching {where} was training within {timeout_s} s")


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # reported by the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def slurm_intervals(sweep_dir: Path, slurm_env: dict) -> list[tuple[int, int]]:
    """(start, end) in epoch seconds of every array task the sweep submitted, as Slurm recorded them."""
    arrays = {Path(p).name.split("_")[0] for p in glob.glob(str(sweep_dir / ".submitit" / "*_*"))}
    out = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-o", "%i|%S|%e", "-j", ",".join(sorted(arrays))],
                         capture_output=True, text=True, check=True, env={**os.environ, **slurm_env}).stdout
    to_s = lambda t: int(time.mktime(time.strptime(t, "%Y-%m-%dT%H:%M:%S")))  # noqa: E731
    return [(to_s(s), to_s(e)) for _, s, e in (line.split("|") for line in out.split())]


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # an end before a start
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# ------------------------------------------------------------------------------ tests
def test_sweep_runs_as_slurm_jobs_two_at_a_time(slurm, tracking, tmp_path):
    sweep_dir = tmp_path / "sweep"
    t0 = time.monotonic()
    res = run_train(["-m", "hydra/launcher=slurm", "hydra.launcher.array_parallelism=2", "clip.max_norm=1,5,20",
                     "trainer.epochs=2", f"hydra.sweep.dir={sweep_dir}", *LEAN, *tracking], tmp_path, env=slurm)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"3-job Slurm sweep: {wall:.1f} s")

    client, parents, children = runs(tracking)
    assert len(parents) == 1 and len(children) == 3
    assert {c.data.tags[PARENT_TAG] for c in children} == {parents[0].info.run_id}  # the context reached the jobs
    assert sorted(c.data.params["clip.max_norm"] for c in children) == ["1.0", "20.0", "5.0"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert points(client, child) == 2 * STEPS_PER_EPOCH  # every step's telemetry arrived, once
        assert points(client, child, "grad_norm/rnn.U") == 2 * STEPS_PER_EPOCH
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["sweep/runs"] == 3 and parents[0].data.metrics["sweep/finished"] == 3

    jobs = slurm_intervals(sweep_dir, slurm)  # Slurm's own record of when each job ran
    assert len(jobs) == 3
    assert most_at_once(jobs) == 2  # array_parallelism=2: two at a time, never three
    assert len(glob.glob(str(sweep_dir / ".submitit" / "*_*" / "*_log.out"))) == 3  # submitit's logs in the sweep


def test_a_data_parallel_job_runs_as_one_slurm_task(slurm, tracking, tmp_path):
    """trainer.devices=2 on Slurm: one task (tasks_per_node=1) with 2 CPUs starts its own second
    rank; its run records the norms of the devices=1 job beside it. (tasks_per_node=2: the tasks are
    the ranks, test_the_tasks_of_a_job_are_its_ranks.)"""
    res = run_train(["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=2", "trainer.devices=1,2",
                     "model=mlp", "data=moons", "trainer.batch_size=50", "trainer.epochs=3", "optimizer.lr=0.002",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", *LEAN, *tracking], tmp_path, env=slurm)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    client, _, children = runs(tracking)
    by = {c.data.params["trainer.devices"]: c for c in children}
    assert sorted(by) == ["1", "2"] and {c.info.status for c in children} == {"FINISHED"}  # one run per job
    one, two = (gradsweep.history(by[n].info.run_id, tracking[0].split("=", 1)[1]) for n in ("1", "2"))
    assert list(one.columns) == list(two.columns) and list(one.index) == list(two.index) and len(one) > 0
    norms = [c for c in one.columns if c.startswith("grad_norm/")]
    np.testing.assert_allclose(two[norms].to_numpy(), one[norms].to_numpy(), rtol=1e-5, atol=1e-7)


MOONS = ["model=mlp", "data=moons", "trainer.batch_size=50", "optimizer.lr=0.002"]


def slurm_processes(job: str, rank: int) -> list[int]:
    """The Python processes of task ``rank`` of Slurm job ``job`` (:func:`job_id`) on this node."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"submitit" in cmd and env.get("SLURM_PROCID") == str(rank) and job_id(env) == job:
            found.append(int(proc.name))
    return found


def test_the_tasks_of_a_job_are_its_ranks(slurm, tracking, tmp_path):
    """hydra.launcher.tasks_per_node=2: each job is 2 Slurm tasks of one step, and they are its 2
    ranks (trainer.devices=1 or 2 alike). Task 0 records one run per job, whose per-step norms are
    those of a one-process run with the same global batch; task 1 records nothing and leaves nothing."""
    sweep = tmp_path / "sweep"
    res = run_train(["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "trainer.devices=1,2",
                     *MOONS, "trainer.epochs=3", f"hydra.sweep.dir={sweep}", *LEAN, *tracking], tmp_path, env=slurm)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reference = [tracking[0], tracking[1] + "-one-process"]
    res = run_train([*MOONS, "trainer.epochs=3", *LEAN[:2], *reference], tmp_path)  # here, one process
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    client, parents, children = runs(tracking)
    assert len(parents) == 1 and len(children) == 2  # one run per job: task 1 opens none
    assert {c.info.status for c in children} == {"FINISHED"}
    (one_run,) = runs(reference)[1]
    uri = tracking[0].split("=", 1)[1]
    one = gradsweep.history(one_run.info.run_id, uri)
    norms = [c for c in one.columns if c.startswith("grad_norm/")]
    for child in children:
        two = gradsweep.history(child.info.run_id, uri)
        assert list(two.columns) == list(one.columns) and list(two.index) == list(one.index) and len(one) > 0
        np.testing.assert_allclose(two[norms].to_numpy(), one[norms].to_numpy(), rtol=1e-5, atol=1e-7)
    for job in ("0", "1"):
        folder = sweep / job
        assert not list(folder.glob(".ranks-*"))  # where the ranks met is removed with the job
        log = (folder / "train.log").read_text()
        assert "data parallel over 2 processes (2 tasks of slurm job" in log
        assert log.count("Job completed successfully") == 1  # task 1's lines stay out of the job's log
    # submitit's own record: every job ran as 2 tasks, and each task ended with a result
    assert len(glob.glob(str(sweep / ".submitit" / "*_*" / "*_[01]_result.pkl"))) == 4


def test_a_killed_task_fails_its_job_in_one_line(slurm, tracking, tmp_path):
    """Task 1 of a 2-task job is killed (SIGKILL) mid-run: rank 0's next all-reduce fails, its run
    ends FAILED naming the rank, the sweep says so in its last line and exits 1; nothing hangs."""
    sweep = tmp_path / "sweep"

    def kill_rank_1():  # as soon as the job trains (its log's first step line): a short history to deliver
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = sweep / "0" / "train.log"
            if log.is_file() and "step 10/" in log.read_text():
                (folder,) = glob.glob(str(sweep / ".submitit" / "[0-9]*"))
                (pid,) = slurm_processes(Path(folder).name, 1)
                os.kill(pid, 9)
                return {"job": Path(folder).name}
            time.sleep(0.2)
        raise AssertionError("the job was not training within 120 s")

    watcher, seen = in_background(kill_rank_1)
    t0 = time.monotonic()
    try:
        res = run_train(["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", *MOONS,
                         "trainer.epochs=100000", f"hydra.sweep.dir={sweep}", *LEAN, *tracking], tmp_path,
                        env=slurm, timeout=240)
    finally:  # a job that outlived a failed test would train on for hours
        for folder in glob.glob(str(sweep / ".submitit" / "[0-9]*")):
            subprocess.run(["scancel", Path(folder).name], env={**os.environ, **slurm}, capture_output=True)
    wall = time.monotonic() - t0
    watcher.join(5)
    assert "error" not in seen, seen.get("error")
    killed = seen["value"]
    print(f"sweep with a killed task: {wall:.1f} s; its last line: {res.stderr.strip().splitlines()[-1]}")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert last.startswith(f"error: 2 tasks of slurm job {killed['job']}: rank 1 (on ") and \
        "stopped: no sign of life" in last and "while training; the run is FAILED" in last, last
    client, _, children = runs(tracking)
    (run,) = children
    assert run.info.status == "FAILED"
    assert "rank 1 (on " in run.data.tags["failure_reason"]
    assert not slurm_processes(killed["job"], 0) and not slurm_processes(killed["job"], 1)
    assert not list((sweep / "0").glob(".ranks-*"))


def test_cancelled_job_is_killed_and_the_sweep_goes_on(slurm, tracking, tmp_path):
    """Job #0 trains 15000 steps and is scancelled mid-run; #1 and #2 (one of them queued behind the
    cancelled one) finish, the sweep writes its summary and says which job was lost."""
    watcher, seen = in_background(cancel_when_training, tracking, "params.`trainer.epochs` = '3000'", slurm)
    t0 = time.monotonic()
    res = run_train(["-m", "hydra/launcher=slurm", "trainer.epochs=3000,2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     *LEAN, *tracking], tmp_path, env=slurm)
    wall = time.monotonic() - t0
    watcher.join(5)
    assert "error" not in seen, seen.get("error")
    cancelled = seen["value"]
    print(f"sweep with a cancelled job: {wall:.1f} s; cancelled {cancelled}")

    # Hydra's basic sweeper raises a failed job once the batch is over: exit 1, naming the job
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"slurm job {cancelled['job']}) ended CANCELLED without a result" in res.stdout + res.stderr
    client, parents, children = runs(tracking)
    by_epochs = {c.data.params["trainer.epochs"]: c for c in children}
    assert set(by_epochs) == {"3000", "2", "3"}
    killed = by_epochs["3000"]
    assert killed.info.run_id == cancelled["run_id"]
    assert killed.info.status == "KILLED"  # SIGTERM from scancel: the job closed its own run
    assert cancelled["points"] <= points(client, killed) < 3000 * STEPS_PER_EPOCH  # what it did is kept
    for epochs in ("2", "3"):
        assert by_epochs[epochs].info.status == "FINISHED"
        assert points(client, by_epochs[epochs]) == int(epochs) * STEPS_PER_EPOCH
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/runs"] == 3 and parent.data.metrics["sweep/finished"] == 2
    assert not [c for c in children if c.info.status == "RUNNING"]


def test_optuna_sweep_on_slurm_fails_the_cancelled_trial(slurm, tracking, postgres, tmp_path):
    """Two trials at once as Slurm jobs, the study on PostgreSQL: the trial whose job is scancelled
    is told FAIL with the reason, the other completes with the dev accuracy it reported."""
    storage = f"postgresql://postgres@127.0.0.1:{postgres.port}/optuna"
    watcher, seen = in_background(cancel_when_training, tracking, "params.`trainer.epochs` = '3000'", slurm)
    res = run_train(["-m", "hydra/launcher=slurm", "hydra/sweeper=gradsweep_optuna", "hydra/sweeper/sampler=grid",
                     "hydra/sweeper/pruner=none", "trainer.epochs=choice(3,3000)", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.n_jobs=2", "hydra.sweeper.max_failure_rate=0.5", "hydra.sweeper.figures=false",
                     f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=on_slurm",
                     "trainer.eval_every_steps=5", f"hydra.sweep.dir={tmp_path / 'sweep'}", *LEAN, *tracking],
                    tmp_path, env=slurm)
    watcher.join(5)
    assert "error" not in seen, seen.get("error")
    cancelled = seen["value"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]  # one failure of two is allowed

    study = optuna.load_study(study_name="on_slurm", storage=make_storage(resolve_storage_url(storage)))
    by_epochs = {t.params["trainer.epochs"]: t for t in study.trials}
    assert set(by_epochs) == {3, 3000}
    done, lost = by_epochs[3], by_epochs[3000]
    assert done.state == TrialState.COMPLETE and 0 <= done.value <= 1
    assert sorted(done.intermediate_values) == [4, 9, 14]  # reported from the Slurm job through PostgreSQL
    assert lost.state == TrialState.FAIL
    assert f"slurm job {cancelled['job']}) ended CANCELLED" in lost.user_attrs["gradsweep_failure"]
    assert lost.user_attrs["mlflow_run_id"] == cancelled["run_id"]

    client, parents, children = runs(tracking)
    assert len(parents) == 1 and len(children) == 2
    state = {c.info.run_id: (c.info.status, c.data.tags["optuna.state"]) for c in children}
    assert state[cancelled["run_id"]] == ("KILLED", "FAIL")
    assert state[done.user_attrs["mlflow_run_id"]] == ("FINISHED", "COMPLETE")
    assert parents[0].data.metrics["optuna/failed"] == 1 and parents[0].data.metrics["optuna/complete"] == 1
