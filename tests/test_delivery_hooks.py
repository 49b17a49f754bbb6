"""Delivery hooks: work a journal hands to whichever process delivers it (a sweep's summary goes to
its parent run from the sweep's delivery process, or from `gradsweep sync` after an outage), run
only once the records before it, and the sweep's children, are on a real embedded store."""
import csv

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gradsweep.names import BEST_DEV_ACC, GRAD_TOTAL
from gradsweep.report.hooks import run_figure, sweep_summary
from gradsweep.track.delivery import deliver
from gradsweep.track.hooks import hook_target
from gradsweep.track.journal import STATE, RunJournal, now_ms, read_json
from gradsweep.track.ownership import close_dead_runs_hook
from gradsweep.track.tracker import default_artifact_location

pytestmark = pytest.mark.integration

SUMMARY, FIGURE, CLOSE_DEAD = (hook_target(h) for h in (sweep_summary, run_figure, close_dead_runs_hook))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module (creating MLflow's schema costs seconds)."""
    root = tmp_path_factory.mktemp("hooks")
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}", root / "mlruns" / "spool"


def journal(store, name, parent=None):
    """A journal whose run the deliverer creates (as a job's delivery process does)."""
    uri, spool = store
    header = {"uri": uri, "experiment_name": "hooks", "artifact_location": default_artifact_location(uri),
              "create": {"run_name": name, "tags": {}, "parent_run_id": None,
                         "parent_local_id": parent.local_id if parent else None, "start_time": now_ms()}}
    if parent:
        header["parent_local_id"] = parent.local_id
    return RunJournal.create(spool, header)


def child(store, parent, clip, dev_acc, end=True):
    j = journal(store, f"clip.max_norm={clip}", parent)
    j.log_params({"clip.max_norm": clip, "trainer.seed": 0})
    for step in range(5):
        j.log_metrics(step, {GRAD_TOTAL: 10.0 * (step + 1)})
    j.log_metrics(4, {BEST_DEV_ACC: dev_acc})
    if end:
        j.end("FINISHED")
    return j


def test_sweep_summary_runs_where_the_parent_is_delivered_after_its_children(store, tmp_path):
    parent = journal(store, "sweep")
    parent.after_delivery(close_dead_runs_hook)
    kids = [child(store, parent, 1, 0.25), child(store, parent, 5, 0.75)]
    parent.after_delivery(sweep_summary, out_dir=str(tmp_path / "sweep"))
    parent.end("FINISHED")

    assert deliver(parent.folder)  # the parent first: its hook delivers the children it waits for
    state = read_json(parent.folder / STATE)
    result = state["hooks"][SUMMARY]
    client = MlflowClient(store[0])
    kid_ids = [read_json(k.folder / STATE)["run_id"] for k in kids]
    assert sorted(result["children"]) == sorted(kid_ids)
    assert state["hooks"][CLOSE_DEAD] == {"closed": []}
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["sweep/runs"] == 2 and run.data.metrics[BEST_DEV_ACC] == 0.75
    assert {a.path for a in client.list_artifacts(run.info.run_id, "sweep")} >= {
        "sweep/summary.csv", "sweep/summary.md", "sweep/runs.csv", "sweep/grad_norm_total.png"}
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert sorted(r["config"] for r in rows) == ["clip.max_norm=1", "clip.max_norm=5"]
    for kid in kid_ids:
        assert client.get_run(kid).data.tags["mlflow.parentRunId"] == run.info.run_id
        assert len(client.get_metric_history(kid, GRAD_TOTAL)) == 5


def test_the_summary_waits_for_a_child_still_being_written(store, tmp_path):
    parent = journal(store, "sweep")
    done = child(store, parent, 1, 0.5)
    running = child(store, parent, 5, 0.6, end=False)
    parent.after_delivery(sweep_summary, out_dir=str(tmp_path / "sweep"))
    parent.end("FINISHED")

    assert not deliver(parent.folder)  # stops before the hook, the rest of the journal untouched
    state = read_json(parent.folder / STATE)
    assert "hooks" not in state and not state["done"]
    assert read_json(done.folder / STATE)["done"]
    running.end("FINISHED")
    assert deliver(parent.folder)
    state = read_json(parent.folder / STATE)
    assert len(state["hooks"][SUMMARY]["children"]) == 2
    assert MlflowClient(store[0]).get_run(state["run_id"]).data.metrics["sweep/finished"] == 2


def test_a_hook_the_deliverer_does_not_know_is_recorded_not_run_and_the_run_still_arrives(store, tmp_path):
    """A journal is data: only a function under gradsweep. marked as a delivery hook runs. Anything
    else it names (code elsewhere, a gradsweep function that is no hook, the short names of journals
    written before hooks were named by target) is recorded as refused; the run arrives all the same."""
    import os

    with pytest.raises(ValueError, match="not a delivery hook"):
        journal(store, "writer").after_delivery(os.remove)  # refused when written, too
    j = journal(store, "odd")
    j.log_metrics(0, {"x": 1.0})
    witness = tmp_path / "witness"
    witness.write_text("still here")
    targets = ["rm -rf /", "os:remove", "shutil:rmtree", "gradsweep.track.journal:read_json", "sweep_summary",
               "gradsweep.nowhere:hook"]
    for target in targets:  # as a hand-edited or older journal holds them
        j._append({"op": "hook", "hook": target, "kwargs": {"path": str(witness)}})
    j.end("FINISHED")
    assert deliver(j.folder)
    state = read_json(j.folder / STATE)
    assert all("unknown hook" in state["hooks"][t]["error"] for t in targets), state["hooks"]
    assert witness.read_text() == "still here"
    run = MlflowClient(store[0]).get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["x"] == 1.0


def test_a_jobs_figure_is_drawn_by_its_deliverer_from_the_journal(store, tmp_path):
    """`run_figure`: the job writes only the hook record; the deliverer draws the per-parameter norms
    from the journal's own values, saves them where the job asked and logs them to the run."""
    j = journal(store, "figure")
    j.define_steps(["train/loss", GRAD_TOTAL, "grad_norm/total_clipped", "grad_norm/rnn.W"], 6)
    for step in range(6):
        j.log_steps(np.array([step]), np.array([[1.0, 2.0 ** step, 1.0, 0.5 * step]], np.float32))
    out = tmp_path / "out" / "figures" / "grad_norms.png"
    j.after_delivery(run_figure, path=str(out), title="clip.max_norm=1")
    j.end("FINISHED")
    assert deliver(j.folder)
    state = read_json(j.folder / STATE)
    assert state["hooks"][FIGURE] == {"drawn": True, "path": str(out)}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(store[0])
    assert [a.path for a in client.list_artifacts(state["run_id"], "figures")] == ["figures/grad_norms.png"]
    assert client.get_run(state["run_id"]).info.status == "FINISHED"


def test_a_figure_whose_folder_cannot_be_written_still_reaches_the_run(store, tmp_path):
    """`gradsweep sync` on another machine: the job's output folder is not there (here: a file is in
    the way), so the figure is drawn in a temporary folder and still logged."""
    (tmp_path / "blocked").write_text("a file, not a folder")
    j = journal(store, "figure elsewhere")
    j.define_steps([GRAD_TOTAL], 1)
    j.log_steps(np.array([0]), np.array([[3.0]], np.float32))
    j.after_delivery(run_figure, path=str(tmp_path / "blocked" / "figures" / "grad_norms.png"))
    j.end("FINISHED")
    assert deliver(j.folder)
    state = read_json(j.folder / STATE)
    assert state["hooks"][FIGURE]["drawn"] and "blocked" not in state["hooks"][FIGURE]["path"]
    assert [a.path for a in MlflowClient(store[0]).list_artifacts(state["run_id"], "figures")] == \
        ["figures/grad_norms.png"]


def test_the_deliverer_loads_what_announced_hooks_need_before_they_run(tmp_path):
    """A journal's header lists what the hooks it will ask for import (``preload``); the delivery
    process imports those gradsweep modules (matplotlib for figures) while it waits, in a fresh
    interpreter: nothing for a journal that announces none, never a module outside gradsweep."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, threading, time; from pathlib import Path; "
            "from gradsweep.track.delivery import Preloader; from gradsweep.track.journal import RunJournal; "
            "spool = Path(sys.argv[1]); p = Preloader(); "
            "quiet = RunJournal.create(spool, {'uri': 'sqlite:///x.db', 'experiment_name': 'e'}); p([quiet.folder]); "
            "print('none', [t.name for t in threading.enumerate() if t is not threading.main_thread()] == [], "
            "'matplotlib' in sys.modules); "
            "j = RunJournal.create(spool, {'uri': 'sqlite:///x.db', 'experiment_name': 'e', "
            "'preload': ['os', 'gradsweep.report.hooks', 'gradsweep.report.figures']}); "
            "p([quiet.folder, j.folder]); p([j.folder]); "
            "[t.join() for t in threading.enumerate() if t is not threading.main_thread()]; "
            "print('figure', 'matplotlib.pyplot' in sys.modules, sorted(p.started))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "spool")], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["none True False",
                                          "figure True ['gradsweep.report.figures', 'gradsweep.report.hooks']"]


SPOOLED_SWEEP = """
import sys
from gradsweep.names import WORKER_TAG
from gradsweep.track.journal import RunJournal, now_ms, worker_id
from gradsweep.track.ownership import close_dead_runs_hook

uri, spool, artifacts = sys.argv[1:]

def journal(name, parent=None):
    create = {"run_name": name, "tags": {WORKER_TAG: worker_id()}, "parent_run_id": None,
              "parent_local_id": parent.local_id if parent else None, "start_time": now_ms()}
    return RunJournal.create(spool, {"uri": uri, "experiment_name": "spooled sweep", "artifact_location": artifacts,
                                     "create": create, "parent_local_id": parent.local_id if parent else None})

parent = journal("sweep")
parent.after_delivery(close_dead_runs_hook)
for clip in (1, 5):
    kid = journal(f"clip.max_norm={clip}", parent)
    kid.log_metrics(0, {"grad_norm/total": 10.0 * clip})
    kid.end("FINISHED")
parent.end("FINISHED")
"""


def test_a_sweep_spooled_by_a_process_that_ended_is_delivered_without_closing_its_own_parent(store, tmp_path,
                                                                                             capsys):
    """A sweep journaled during an outage by a process that has ended, delivered by `gradsweep sync`:
    the parent's dead-run hook leaves the parent it is delivered with, and its children, to their
    journals (which end them FINISHED), and closes nothing."""
    import subprocess
    import sys

    from gradsweep.cli.main import main

    uri, _ = store
    spool = tmp_path / "spool"
    subprocess.run([sys.executable, "-c", SPOOLED_SWEEP, uri, str(spool), default_artifact_location(uri)], check=True)
    assert main(["sync", "--spool", str(spool)]) == 0
    out = capsys.readouterr().out
    assert "delivered 3 of 3 spooled runs" in out and "ends KILLED" not in out, out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("spooled sweep").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["clip.max_norm=1", "clip.max_norm=5", "sweep"]
    for run in runs:
        assert run.info.status == "FINISHED" and "failure" not in run.data.tags, (run.info.run_name, run.data.tags)


ENDED_WRITER = """
import os, sys
from pathlib import Path
from gradsweep.track.journal import RunJournal, now_ms

uri, spool, artifacts, job = sys.argv[1:]
j = RunJournal.create(spool, {"uri": uri, "experiment_name": "one copy", "artifact_location": artifacts,
                              "create": {"run_name": "job", "tags": {}, "start_time": now_ms()}})
ckpt = Path(job) / "checkpoints"
for name in ("last", "best"):
    (ckpt / f"{name}.pt").write_bytes(name.encode() * 100)
    j.log_artifact(ckpt / f"{name}.pt", "checkpoints", move=True)
(Path(job) / "config.yaml").write_text("a: 1")
j.log_artifact(Path(job) / "config.yaml")
new = ckpt / "best.new"
new.write_bytes(b"rewritten after it was logged")
os.replace(new, ckpt / "best.pt")
j.end("FINISHED")
"""


def test_a_delivered_run_leaves_one_copy_of_what_it_moved_and_no_spool_folder(store, tmp_path):
    """``move`` (tracking.keep_local_artifacts=false): once the store has the run, the job folder's copy
    of each file logged so is removed, unless the file changed after it was logged (the store lacks
    that one). The spool folder kept for the run's owner goes once the owner has ended, in whichever
    process cleans up next (here: another owner's delivery process ending)."""
    import os
    import subprocess
    import sys

    from gradsweep.track.delivery import pending, remove_delivered

    uri, _ = store
    spool, job = tmp_path / "spool", tmp_path / "job"
    (job / "checkpoints").mkdir(parents=True)
    subprocess.run([sys.executable, "-c", ENDED_WRITER, uri, str(spool), default_artifact_location(uri), str(job)],
                   check=True)
    (folder,) = pending(spool)
    assert deliver(folder)
    state = read_json(folder / STATE)
    client = MlflowClient(uri)
    assert {a.path: a.file_size for a in client.list_artifacts(state["run_id"], "checkpoints")} == \
        {"checkpoints/last.pt": 400, "checkpoints/best.pt": 400}
    assert not (job / "checkpoints" / "last.pt").exists()  # the store's copy is the only one
    assert (job / "checkpoints" / "best.pt").read_bytes() == b"rewritten after it was logged"
    assert (job / "config.yaml").read_text() == "a: 1"  # logged without move: kept
    assert state["done"] and folder.is_dir()  # kept for its owner (a run created from the spool)
    assert remove_delivered(spool, owner_pid=os.getpid()) == 1 and [p for p in spool.iterdir() if p.is_dir()] == []
