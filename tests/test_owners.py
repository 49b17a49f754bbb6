"""Who owns a run and a job's folder, and how we know its writer is alive: a PID alone is not an
owner (a dead writer's PID reused, or one a PID namespace numbered; see also test_faults), a job's
folder is one running job's (test_checkpoint_resume) and two writers never share a temporary file."""
import json
import os
import subprocess
import sys
import threading

from gradsweep.names import WORKER_TAG

import pytest

pytestmark = pytest.mark.integration

DIES_WITHOUT_ENDING = """
import os, sys
from gradsweep.track.journal import RunJournal, now_ms
j = RunJournal.create(sys.argv[2], {"uri": sys.argv[1], "experiment_name": "owners", "create": {
    "run_name": "dead", "tags": {}, "parent_run_id": None, "parent_local_id": None, "start_time": now_ms()}})
j.log_metrics(0, {"train/loss": 1.0})
j.flush()
os._exit(0)  # gone without ending its run
"""


def test_a_live_pid_that_is_not_the_writer_does_not_keep_a_run_running(tmp_path, store, capsys):
    """The recorded PID is alive but is another process (reused after the writer died): `gradsweep
    sync` and the dead-run check both close the run, from the writer's start time and boot id
    where its lock cannot be seen; the live writer itself is left alone."""
    from gradsweep.cli.main import main
    from gradsweep.locks import process_id
    from gradsweep.track.ownership import close_dead_runs
    from gradsweep.track.tracker import Tracker

    spool = tmp_path / "spool"
    subprocess.run([sys.executable, "-c", DIES_WITHOUT_ENDING, store, str(spool)], check=True)
    (folder,) = spool.iterdir()
    header = json.loads((folder / "header.json").read_text())
    first, *identity = header["worker"].split()
    reused = f"{first.rpartition(':')[0]}:{os.getpid()}"  # its PID is this (live) process's now
    header.update(worker=" ".join([reused, *identity]), owner_pid=os.getpid())
    (folder / "header.json").write_text(json.dumps(header))
    (folder / "writer.lock").unlink(missing_ok=True)  # no lock to ask: the identity alone must tell
    assert main(["sync", "--spool", str(spool)]) == 0
    out = capsys.readouterr().out
    assert "ends KILLED" in out and "delivered 1 of 1" in out, out
    tracker = Tracker(store, "owners")
    (run,) = tracker.client.search_runs([tracker.experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["failure"] == "worker_died"
    assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, "train/loss")] == [1.0]

    # on the store (no journal to look at): the same PID with another start time is not its writer
    other = tracker.start_run("reused", {WORKER_TAG: " ".join([reused, *identity])})
    live = tracker.start_run("live", {WORKER_TAG: process_id()})
    assert close_dead_runs(tracker) == [other]
    assert tracker.client.get_run(live).info.status == "RUNNING"
    assert tracker.client.get_run(other).data.tags["failure"] == "worker_died"


def test_two_writers_of_one_checkpoint_never_rename_each_others_file(tmp_path):
    """Each writer of a file has its own temporary name: none renames another's half-written file away."""
    import torch

    from gradsweep.train.checkpoints import CheckpointStore

    store, errors = CheckpointStore(tmp_path), []

    def save(value):
        try:
            for _ in range(40):
                store.save("last", {"w": torch.full((256,), float(value))})
        except OSError as e:
            errors.append(e)

    writers = [threading.Thread(target=save, args=(v,)) for v in (5, 7)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert errors == [] and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(tmp_path / "last.pt")["w"].unique().tolist() in ([5.0], [7.0])
