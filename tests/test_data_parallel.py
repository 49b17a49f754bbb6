"""trainer.devices=N: one job over N torch.distributed processes (gloo on this CPU machine). The
norms it records are those of the all-reduced gradients, equal to a one-process run's with the same
global batch; only rank 0 records; resume works."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gradsweep
from conftest import TRAIN, fresh_store, run_train
from jobs import run_inprocess

pytestmark = pytest.mark.integration

MOONS = ["model=mlp", "data=moons", "trainer.batch_size=50", "tracking.log_checkpoints=false"]


def assert_same_steps(one, two, names, rtol=1e-5) -> None:
    for name in names:
        a, b = np.asarray(one[name], dtype=float), np.asarray(two[name], dtype=float)
        assert len(a) == len(b) and len(a) > 0, name
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-7, err_msg=name)


def test_two_processes_record_one_processs_norms_with_reduction_sum(tmp_path):
    """reduction=sum (the default): each rank back-propagates its share's sum x 2, DDP averages:
    the global batch's gradient. A small lr keeps the run away from chaos, where any rounding grows."""
    common = [*MOONS, "trainer.epochs=3", "optimizer.lr=0.002"]
    one = run_inprocess(common, tmp_path / "one", "memory")
    two = run_inprocess([*common, "trainer.devices=2"], tmp_path / "two", "memory")
    assert one.status == two.status == "FINISHED"
    assert one.history.names == two.history.names
    names = [n for n in one.history.names if n != "clip/coef"]
    assert_same_steps({n: one.history.history[n][1] for n in names}, {n: two.history.history[n][1] for n in names},
                      names)


def test_a_sweep_over_devices_records_equal_histories_and_resumes(tmp_path, migrated_db):
    store = f"sqlite:///{fresh_store(tmp_path / 'mlruns', migrated_db)}"
    res = run_train(["-m", *MOONS, "trainer.reduction=mean", "trainer.epochs=4", "trainer.devices=1,2",
                     "tracking.log_checkpoints=true",
                     f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id],
                              filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(runs) == 2  # the ranks > 0 record nothing: no run of their own
    by = {r.data.params["trainer.devices"]: r for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}
    one, two = (gradsweep.history(by[n].info.run_id, store) for n in ("1", "2"))
    assert list(one.columns) == list(two.columns) and list(one.index) == list(two.index)
    assert_same_steps(one, two, [c for c in one.columns if c != "clip/coef"])
    assert set(by["1"].data.metrics) == set(by["2"].data.metrics)

    # resume the FINISHED 2-process run, longer: a new run linked to it continues its history
    run_id = by["2"].info.run_id
    res = run_train([*MOONS, "trainer.reduction=mean", "trainer.epochs=6", "trainer.devices=2",
                     f"trainer.resume_from={run_id}", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (new,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id],
                                filter_string=f"tags.`gradsweep.resumed_from` = '{run_id}'")
    assert new.info.status == "FINISHED" and len(gradsweep.history(run_id, store)) == len(two)  # original as it was
    more = gradsweep.history(new.info.run_id, store)
    assert list(more.index) == list(range(len(two), len(two) * 6 // 4))  # the steps after the checkpoint


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the kernel's own children lists, each thread's)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def test_a_killed_rank_fails_the_whole_job_and_leaves_no_process(tmp_path, migrated_db):
    store = f"sqlite:///{fresh_store(tmp_path / 'mlruns', migrated_db)}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, str(TRAIN), *MOONS, "trainer.epochs=100000", "trainer.devices=2",
                             f"tracking.uri={store}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline, rank = time.monotonic() + 120, None
    while rank is None and time.monotonic() < deadline and proc.poll() is None:
        ranks = [p for p in descendants(proc.pid) if b"_rank_main" in Path(f"/proc/{p}/cmdline").read_bytes()
                 or b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        client = MlflowClient(store)
        exp = client.get_experiment_by_name("gradsweep")
        training = exp and [r for r in client.search_runs([exp.experiment_id]) if r.data.metrics]
        rank = ranks[0] if ranks and training else None
        time.sleep(0.2)
    assert rank is not None, (proc.poll(), proc.stderr.read()[-3000:] if proc.poll() is not None else "")
    os.kill(rank, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # never hangs in its next all-reduce
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert "error: trainer.devices=2: rank 1 killed by signal 9 while training; the run is FAILED" in \
        err.strip().splitlines()[-1], err[-3000:]
    (run,) = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("gradsweep").experiment_id])
    assert run.info.status == "FAILED" and "rank 1 killed by signal 9" in run.data.tags["failure_reason"], err[-3000:]
    assert not [p for p in descendants(proc.pid)]  # nothing left running


@pytest.mark.parametrize("launcher,key", [("slurm", "tasks_per_node"), ("slurm", "nodes"), ("local", "tasks_per_node")])
def test_with_several_tasks_per_job_devices_is_one_or_the_task_count(launcher, key):
    """N submitit tasks per job are its N ranks: trainer.devices=1 or N runs, anything else is refused
    at preflight (no cluster needed: nothing is submitted), each job's value checked."""
    from gradsweep.errors import ConfigError
    from gradsweep.paths import CONF_DIR
    from gradsweep.sweep.hydra_adapter import preflight

    command = ["-m", f"hydra/launcher={launcher}", f"hydra.launcher.{key}=2", "tracking.backend=memory"]
    with pytest.raises(ConfigError) as e:
        preflight(str(CONF_DIR), "config", [*command, "trainer.devices=2,3"])
    assert str(e.value) == "trainer.devices=3 is invalid; allowed: 1 or 2 with 2 tasks per job " \
        "(hydra.launcher.tasks_per_node x nodes: each task is one rank)"
    assert preflight(str(CONF_DIR), "config", [*command, "trainer.devices=1,2"]) == 2
    # one task per job: the job starts its own ranks, any number of them
    assert preflight(str(CONF_DIR), "config", ["-m", f"hydra/launcher={launcher}", "trainer.devices=3",
                                               "tracking.backend=memory"]) == 1
