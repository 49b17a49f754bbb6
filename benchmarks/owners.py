"""Reliability rows for who owns a run and a job's folder (README, "Reliability"): real processes.

    .venv/bin/python benchmarks/owners.py

1. a job in its own PID namespace (`unshare --pid`, as in a container) SIGKILLed while the store is
   down, then `gradsweep sync`: the PID it recorded, sync's exit, the run's status, values delivered;
2. a sweep spooled while the store is down, then `gradsweep sync`: the parent's status and tags,
   runs sync closed as dead;
3. two processes resuming one killed run at the same moment: exit codes, steps on the store, steps
   holding two values;
4. two sweeps started together with one `hydra.sweep.dir`: exit codes, checkpoints whose config is
   not their own run's.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability import ROOT, TRAIN, job

sys.path.insert(0, str(ROOT / "src"))
import torch
from gradsweep.track.delivery import mlflow_client as MlflowClient  # takes turns creating a new store
from gradsweep.track.delivery import pending
from gradsweep.track.journal import has_artifact
from gradsweep.track.server import MlflowServer

GRADSWEEP = str(Path(sys.executable).parent / "gradsweep")


def _sync(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([GRADSWEEP, "sync"], cwd=root, capture_output=True, text=True)


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])


def namespace_killed(root: Path) -> dict:
    server = MlflowServer(root)  # down: the job spools
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, str(TRAIN),
                             "trainer.epochs=400", f"tracking.uri={server.uri}"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spool = root / "mlruns" / "spool"
    while proc.poll() is None and not any((f / "steps.bin").exists() and (f / "steps.bin").stat().st_size > 20_000
                                          for f in pending(spool)):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    (folder,) = pending(spool)
    pid = json.loads((folder / "header.json").read_text())["owner_pid"]
    server.start()
    try:
        sync = _sync(root)
        (run,) = _runs(server.uri)
        values = len(MlflowClient(server.uri).get_metric_history(run.info.run_id, "grad_norm/total"))
    finally:
        server.stop()
    return {"case": f"job in a PID namespace (recorded PID {pid}) SIGKILLed while spooled, then `gradsweep sync`",
            "result": f"sync exit {sync.returncode}; run {run.info.status}, failure={run.data.tags.get('failure')}; "
                      f"{values} steps delivered, 0 still spooled" if "still spooled" not in sync.stdout
            else f"sync exit {sync.returncode}: {sync.stdout.strip().splitlines()[-1]}"}


def spooled_sweep(root: Path) -> dict:
    server = MlflowServer(root)
    job(server.uri, root, "-m", "clip.max_norm=1,5", "trainer.epochs=2", "tracking.delivery_timeout_s=1").communicate()
    server.start()
    try:
        sync = _sync(root)
        runs = _runs(server.uri)
    finally:
        server.stop()
    (parent,) = [r for r in runs if r.data.tags.get("gradsweep.role") == "sweep"]
    closed = "closed" in sync.stdout + sync.stderr
    return {"case": "sweep of 2 jobs spooled while the store is down, then `gradsweep sync`",
            "result": f"sync exit {sync.returncode}; parent {parent.info.status}, failure="
                      f"{parent.data.tags.get('failure', 'none')}; {len(runs) - 1} children "
                      f"{'/'.join(sorted({r.info.status for r in runs if r is not parent}))}; "
                      f"{'a run closed as dead' if closed else 'no run closed as dead'}"}


def two_resumes(root: Path) -> dict:
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    common = ["trainer.epochs=300", "trainer.checkpoint_every_steps=100", "trainer.eval_every_steps=500"]
    proc = job(store, root, *common, "hydra.run.dir=killed")
    while proc.poll() is None:
        if any(has_artifact(f, "checkpoints") for f in pending(root / "mlruns" / "spool", owner_pid=proc.pid)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    client = MlflowClient(store)
    killed = None
    while killed is None:
        running = [r for r in _runs(store) if r.info.status == "RUNNING"]
        if running and client.list_artifacts(running[0].info.run_id, "checkpoints"):
            killed = running[0].info.run_id
        time.sleep(0.1)
    both = [job(store, root, *common, f"trainer.resume_from={killed}", f"hydra.run.dir=resumed{i}") for i in (1, 2)]
    outs = [p.communicate()[0] for p in both]
    points = client.get_metric_history(killed, "grad_norm/total")
    steps = [m.step for m in points]
    doubled = len({s for s in steps if steps.count(s) > 1})
    refused = [o.strip().splitlines()[-1] for p, o in zip(both, outs, strict=True) if p.returncode == 2]
    return {"case": "two processes resume one killed run at the same moment",
            "result": f"exit {sorted(p.returncode for p in both)}; {len(set(steps))} of 1500 steps on the store, "
                      f"{doubled} with two values; run {client.get_run(killed).info.status}"
                      + (f"; refused: \"{refused[0][:90]}...\"" if refused else "")}


def two_sweeps(root: Path) -> dict:
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    args = ["-m", "clip.max_norm=5,7", "trainer.epochs=100", "hydra.sweep.dir=same",
            "tracking.keep_local_artifacts=true"]  # the folders' own checkpoints are what is checked
    sweeps = [job(store, root, *args) for _ in range(2)]
    outs = [p.communicate()[0] for p in sweeps]
    wrong = 0
    for ckpt in (root / "same").glob("*/checkpoints/*.pt"):
        own = (ckpt.parent.parent / "config.yaml").read_text()
        max_norm = torch.load(ckpt, weights_only=True)["config"]["clip"]["max_norm"]
        wrong += f"max_norm: {max_norm}" not in own
    refused = [o.strip().splitlines()[-1] for p, o in zip(sweeps, outs, strict=True) if p.returncode == 2]
    return {"case": "two sweeps started together with one `hydra.sweep.dir`",
            "result": f"exit {sorted(p.returncode for p in sweeps)}; {len(_runs(store))} runs; {wrong} checkpoints "
                      "not of their folder's run" + (f"; refused: \"{refused[0][:70]}...\"" if refused else "")}


def main() -> None:
    rows = []
    for fn in (namespace_killed, spooled_sweep, two_resumes, two_sweeps):
        rows.append(fn(Path(tempfile.mkdtemp(prefix="gradsweep-own-"))))
        print(f"done: {rows[-1]['case']}", file=sys.stderr, flush=True)
    print("| case | result |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['result']} |")


if __name__ == "__main__":
    main()
