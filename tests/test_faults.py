"""Faults injected where a run touches the outside (its journal, the disk under it, the artifact
store, a stalled delivery peer): the process ends within its deadline, no run stays RUNNING, what
was lost is said, and the exit status and the console's last word match what the store holds."""
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TRAIN
from gradsweep.track.delivery import mlflow_client, pending

pytestmark = pytest.mark.integration

EPOCHS = 400  # 2000 steps: long enough to inject a fault mid-run, a few seconds in all


def _job(args, cwd, prefix=()):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return subprocess.Popen([*prefix, sys.executable, str(TRAIN), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _only_run(store):
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    return client, run


def _journal_of(proc, spool, min_bytes=20_000, timeout=120, created=False, owner_pid=True):
    """The job's journal folder once it holds at least ``min_bytes`` of step records (and, if ``created``,
    once its delivery process has created the run on the store). ``owner_pid=False``: any journal of
    the spool (a job in a PID namespace records its own numbering)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for folder in pending(spool, owner_pid=proc.pid if owner_pid else None):
            try:
                if (folder / "steps.bin").stat().st_size >= min_bytes and \
                        (not created or "run_id" in (json.loads((folder / "state.json").read_text())) or {}):
                    return folder
            except (FileNotFoundError, ValueError):
                pass
        time.sleep(0.02)
    pytest.fail(f"the job never wrote {min_bytes} bytes of journal: {proc.communicate()}")


def test_journal_deleted_mid_run_fails_the_run_and_says_so(tmp_path, store):
    proc = _job([f"trainer.epochs={EPOCHS}", f"tracking.uri={store}"], tmp_path)
    folder = _journal_of(proc, tmp_path / "mlruns" / "spool", created=True)
    while folder.exists():  # rm -rf, racing the delivery process that writes state.json beside the journal
        shutil.rmtree(folder, ignore_errors=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "was deleted while the run was going" in last, err[-2000:]
    assert "FAILED in the tracking store" in last and "Traceback" not in err
    assert "Training stopped after step" in err and "is lost" in err  # what was lost, in the console
    client, run = _only_run(store)
    assert run.info.status == "FAILED" and run.data.tags["failure"] == "journal_lost"
    assert " FINISHED" not in out  # the console never claims what the store does not hold


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -m (root) for a private tmpfs")
def test_spool_on_a_full_disk_fails_the_run_and_says_so(tmp_path, store):
    """The spool on a 64 KiB tmpfs (a private mount namespace): it fills mid-run (2000 steps of 60 bytes)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mlflow_client(store)  # the store itself is on the big disk
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && exec {sys.executable} {TRAIN} trainer.epochs={EPOCHS} "
              f"tracking.uri={store} tracking.spool_dir={mnt}")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "could not be written: No space left on device" in last and "Traceback" not in res.stderr, res.stderr[-2000:]
    client, run = _only_run(store)
    assert run.info.status == "FAILED" and run.data.tags["failure"] == "journal_lost"


def test_an_artifact_the_store_cannot_write_does_not_block_the_metrics(tmp_path, store):
    """The embedded store's artifact folder read-only (root loses CAP_DAC_OVERRIDE through setpriv):
    every metric still arrives, the run says which files it lacks, the console says it once per file."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    mlflow_client(store)
    artifacts = tmp_path / "mlruns" / "artifacts"
    artifacts.mkdir()
    artifacts.chmod(0o555)
    epochs = 20
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    proc = _job([f"trainer.epochs={epochs}", f"tracking.uri={store}"], tmp_path, drop)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "the tracking store refused artifact ./config.yaml" in err and "Traceback" not in err
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "grad_norm/total"))
    assert steps == list(range(epochs * 5))  # every step arrived after the refused config.yaml
    assert "artifact ./config.yaml" in run.data.tags["gradsweep.rejected"]
    assert "artifact checkpoints/last.pt" in run.data.tags["gradsweep.rejected"]


def test_a_stalled_delivery_peer_does_not_hold_the_job_past_its_deadline(tmp_path, store):
    """A peer holds the journal's lock and never lets go (a stopped delivery process): the job ends
    after tracking.delivery_timeout_s, leaves the journal for `gradsweep sync`, and sync delivers it."""
    proc = _job([f"trainer.epochs={EPOCHS}", f"tracking.uri={store}", "tracking.delivery_timeout_s=3"], tmp_path)
    folder = _journal_of(proc, tmp_path / "mlruns" / "spool", min_bytes=1)  # 2000 steps: taken long before the end
    fd = os.open(folder / "lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held like a stopped peer would
    try:
        out, err = proc.communicate(timeout=120)  # ends: no path waits past its deadline
    finally:
        os.close(fd)
    assert proc.returncode == 3, err[-3000:]  # trained, not recorded: the exit status says so, and why
    assert "not fully delivered: its delivery made no progress for 3 s" in err and "gradsweep sync" in err
    gradsweep = str(os.path.join(os.path.dirname(sys.executable), "gradsweep"))
    res = subprocess.run([gradsweep, "sync", "--spool", str(tmp_path / "mlruns" / "spool")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    # the job's own delivery process may finish it first, once the lock is free: nothing left then
    assert res.returncode == 0 and ("delivered 1 of 1" in res.stdout or "nothing to deliver" in res.stdout), \
        res.stdout + res.stderr
    client, run = _only_run(store)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "grad_norm/total")) == EPOCHS * 5  # <= max_points: all


def test_a_deleted_experiment_is_one_line(tmp_path, store):
    client = mlflow_client(store)
    client.delete_experiment(client.create_experiment("gone"))
    res = subprocess.run([sys.executable, str(TRAIN), "trainer.epochs=1", f"tracking.uri={store}",
                          "tracking.experiment_name=gone"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "tracking.experiment_name='gone': that experiment is deleted" in lines[0] and "restore" in lines[0]


def _can_unshare_pid() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


def _child(pid: int) -> int:
    """The one child of ``pid`` (the job that ``unshare --fork`` started)."""
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _sync(spool, capsys) -> tuple[int, str]:
    """`gradsweep sync --spool <spool>` in this process (its wiring is the subprocess cases')."""
    import argparse

    from gradsweep.cli.main import sync

    capsys.readouterr()
    code = sync(argparse.Namespace(spool=spool, wait=0.0))
    return code, capsys.readouterr().out


def test_a_job_killed_while_spooled_ends_killed_at_sync(tmp_path, migrated_db, capsys):
    """The store is down, the job is SIGKILLed mid-run: `gradsweep sync` delivers what it journaled
    and closes the run KILLED (failure=worker_died) instead of repeating "1 still spooled"; while the
    job lives, sync leaves its run to it and says so (exit 0). The job
    runs in its own PID namespace where it can (as in any container): it records PID 1, which is
    alive on this host (init) after the job is gone; its writer lock says it is gone."""
    from conftest import MlflowServer, fresh_store

    fresh_store(tmp_path, migrated_db, "server.db")
    server = MlflowServer(tmp_path)  # not started yet: the job spools
    namespace = _can_unshare_pid()
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"] if namespace else []
    proc = _job([f"trainer.epochs={EPOCHS}", f"tracking.uri={server.uri}"], tmp_path, prefix)
    spool = tmp_path / "mlruns" / "spool"
    folder = _journal_of(proc, spool, min_bytes=20_000, owner_pid=not namespace)  # ~330 steps of 60 bytes
    job = _child(proc.pid) if namespace else proc.pid
    os.kill(job, signal.SIGSTOP)  # still its run's writer (it holds the journal's lock) while sync looks
    code, out = _sync(spool, capsys)  # the job's own: not delivered here, not "still spooled", not an error
    assert code == 0 and out.splitlines() == [f"run trainer.epochs={EPOCHS} (pid {1 if namespace else job} on "
                                              f"{socket.gethostname()}) is live: its own process is writing it and "
                                              f"delivers it", f"nothing else to deliver in {spool}"], out
    proc.kill()  # unshare --kill-child: the job dies with it, and every process of its namespace
    proc.communicate(timeout=60)
    if namespace:
        assert json.loads((folder / "header.json").read_text())["owner_pid"] == 1  # a PID this host has too
    from gradsweep.track.steps import StepSchema, read_records

    journaled = len(read_records(folder, StepSchema.load(folder), 0))  # complete step records
    server.start()
    try:
        gradsweep = os.path.join(os.path.dirname(sys.executable), "gradsweep")
        res = subprocess.run([gradsweep, "sync", "--spool", str(spool)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=180)
        assert res.returncode == 0 and "ends KILLED" in res.stdout and "delivered 1 of 1" in res.stdout, \
            res.stdout + res.stderr
        client, run = _only_run(server.uri)
        assert run.info.status == "KILLED" and run.data.tags["failure"] == "worker_died"
        assert len(client.get_metric_history(run.info.run_id, "grad_norm/total")) == journaled > 20
    finally:
        server.stop()


def test_a_read_only_store_is_one_line(tmp_path):
    """An embedded store (or spool) in a folder the user may not write: one line before anything runs."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"] \
        if os.geteuid() == 0 else []
    for args, key in ((["tracking.uri=sqlite:///ro/mlruns/mlflow.db"], "tracking.uri"),
                      (["tracking.spool_dir=ro/spool"], "tracking.spool_dir")):
        proc = _job(["trainer.epochs=1", *args], tmp_path, drop)
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith(f"error: {key}=") and "is not writable (Permission denied)" in lines[0]
    assert not (tmp_path / "outputs").exists() and list(readonly.iterdir()) == []
