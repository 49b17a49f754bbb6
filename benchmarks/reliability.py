"""Reliability table for the README: what survives outages, kills and hostile input.

    .venv/bin/python benchmarks/reliability.py [--outage-s 20]

1. a real `mlflow server` is stopped once training has started, kept down --outage-s seconds, and
   restarted on the same port and store: points on the server vs points expected, duplicates;
2. the server is down for the whole job, then `gradsweep sync`: the same counts;
3. a job SIGKILLed after a checkpoint and resumed into the same run vs an uninterrupted job:
   are the final metrics equal, is every step there exactly once;
4. malformed command lines through the CLI entry: how many are rejected with one line, exit 2,
   and nothing created.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from mlflow.tracking import MlflowClient  # noqa: E402

from gradsweep.track.delivery import pending  # noqa: E402
from gradsweep.track.server import MlflowServer  # noqa: E402
from gradsweep.track.journal import has_artifact  # noqa: E402

TRAIN = ROOT / "src" / "train.py"
TELEMETRY = ["train/loss", "train/acc", "grad_norm/total", "grad_norm/total_clipped", "clip/coef",
             "grad_norm/embedding.weight", "grad_norm/rnn.W", "grad_norm/rnn.U", "grad_norm/rnn.b",
             "grad_norm/classifier.weight", "grad_norm/classifier.bias"]


def job(uri: str, cwd: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen([sys.executable, str(TRAIN), *extra, f"tracking.uri={uri}"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def count_points(uri: str, steps: int) -> tuple[int, int, int]:
    """(points stored, points expected, duplicated points) over the telemetry metrics of the only run."""
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    stored = dup = 0
    for key in TELEMETRY:
        got = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        stored += len(got)
        dup += len(got) - len(set(got))
    return stored, steps * len(TELEMETRY), dup


def outage_mid_run(root: Path, outage_s: float, epochs: int) -> dict:
    server = MlflowServer(root).start(timeout=100)
    proc = job(server.uri, root, f"trainer.epochs={epochs}", "trainer.eval_every_steps=1000")
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if " on cpu: " in line:
            break
    server.stop()
    t0 = time.monotonic()
    time.sleep(outage_s)
    server.start()
    down = time.monotonic() - t0
    lines += proc.stdout.read().splitlines(keepends=True)
    proc.wait()
    stored, expected, dup = count_points(server.uri, epochs * 5)
    server.stop()
    return {"case": f"server down {down:.0f} s mid-run, then back", "stored": stored, "expected": expected,
            "duplicates": dup, "ok": proc.returncode == 0 and stored == expected and dup == 0}


def outage_whole_job(root: Path, epochs: int) -> dict:
    server = MlflowServer(root)
    t0 = time.monotonic()
    proc = job(server.uri, root, f"trainer.epochs={epochs}", "tracking.delivery_timeout_s=1")
    proc.communicate()
    server.start()
    down = time.monotonic() - t0
    sync = subprocess.run([str(Path(sys.executable).parent / "gradsweep"), "sync"], cwd=root, capture_output=True,
                          text=True)
    stored, expected, dup = count_points(server.uri, epochs * 5)
    server.stop()
    return {"case": f"server down for the whole job ({down:.0f} s), then `gradsweep sync`", "stored": stored,
            "expected": expected, "duplicates": dup, "ok": sync.returncode == 0 and stored == expected and dup == 0}


def kill_and_resume(root: Path) -> dict:
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    common = ["trainer.epochs=60", "trainer.checkpoint_every_steps=50"]
    job(store, root, *common, "hydra.run.dir=full").communicate()
    client = MlflowClient(store)
    proc = job(store, root, *common, "hydra.run.dir=killed")
    while proc.poll() is None:  # kill once its own journal has a checkpoint (the store lags behind)
        if any(has_artifact(f, "checkpoints") for f in pending(root / "mlruns" / "spool", owner_pid=proc.pid)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    if proc.wait() != -signal.SIGKILL:
        raise RuntimeError("the job ended before it journaled a checkpoint; nothing was killed")
    exp = client.get_experiment_by_name("gradsweep")
    killed = None
    while killed is None:  # its delivery worker sends the checkpoint once the owner is gone
        running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
        if running and client.list_artifacts(running[0].info.run_id, "checkpoints"):
            killed = running[0].info.run_id
        time.sleep(0.1)
    job(store, root, *common, f"trainer.resume_from={killed}", "hydra.run.dir=resumed").communicate()
    full = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != killed][0]
    resumed = client.get_run(killed)
    keys = ["test/acc", "best/dev_acc", "train/loss", "grad_norm/total"]
    equal = all(full.data.metrics[k] == resumed.data.metrics[k] for k in keys)
    steps = [m.step for m in client.get_metric_history(killed, "grad_norm/total")]
    return {"case": f"SIGKILL at step >= {resumed.data.tags.get('gradsweep.resumed_at_step')}, resumed from the run id",
            "stored": len(steps), "expected": 300, "duplicates": len(steps) - len(set(steps)),
            "ok": equal and sorted(steps) == list(range(300)), "equal": equal}


HOSTILE = [
    "model=foo", "model=0", "clip=bogus", "optimizer.lr=-1", "optimizer.lr=0", "optimizer.lr=abc", "optimizer.lr=nan",
    "optimizer.lr=inf", "clip.max_norm=0", "clip.max_norm=-5", "clip.norm_type=3", "clip.clip_value=-1",
    "trainer.epochs=0", "trainer.epochs=ten", "trainer.batch_size=-1", "trainer.reduction=median",
    "trainer.device=tpu", "trainer.loss=hinge", "model.num_layers=0", "model.num_layers=2.5", "model.hidden_size=-3",
    "model.init=ones", "model.bogus=1", "data=imagenet", "data.length=2", "data.path=/no/such/dir",
    "tracking.uri=not-a-uri", "tracking.uri=http://", "tracking.uri=http://h:99999", "a=b=c", "=1",
    "clip.max_norm=[1,2", "optimizer.lr='0.1", "experiment=nope",
    "model=mlp", "model=mlp data=moons model.activation=swish", "model=mlp data=moons model.weight_init=orthogonal",
    "trainer.resume_from=/etc/hostname", "trainer.resume_from=/no/such.pt", "optimizer=adam optimizer.beta1=1.5",
    "optimizer=rmsprop optimizer.alpha=0", "data=moons data.split=[1,2,3]",
]


def hostile_inputs(root: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    clean = 0
    os.chdir(root)
    for i, override in enumerate(HOSTILE * 2):  # each as a single run and as a sweep
        store = root / f"h{i}"
        argv = ["train.py", *(["-m"] if i >= len(HOSTILE) else []), *override.split(),
                f"tracking.uri=sqlite:///{store}/mlflow.db"]
        if "tracking.uri=" in override:
            argv = argv[:-1]
        sys.argv = argv
        err = io.StringIO()
        code = None
        with contextlib.redirect_stderr(err):
            try:
                train.run_cli(train.main, train.CONFIG_DIR, "config")
            except SystemExit as e:
                code = e.code
        lines = err.getvalue().strip().splitlines()
        if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not store.exists() \
                and not (root / "outputs").exists() and not (root / "multirun").exists():
            clean += 1
        else:
            print(f"not clean: {override!r}: exit {code}: {lines[-3:]}", file=sys.stderr)
    n = 2 * len(HOSTILE)
    return {"case": "malformed command lines (single run and -m sweep)", "stored": clean, "expected": n,
            "duplicates": 0, "ok": clean == n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage-s", type=float, default=20.0)
    ap.add_argument("--epochs", type=int, default=400, help="job length for the outage cases (5 steps/epoch)")
    args = ap.parse_args()
    rows = []
    for fn, kwargs in ((outage_mid_run, {"outage_s": args.outage_s, "epochs": args.epochs}),
                       (outage_whole_job, {"epochs": args.epochs}), (kill_and_resume, {}), (hostile_inputs, {})):
        root = Path(tempfile.mkdtemp(prefix="gradsweep-rel-"))
        rows.append(fn(root, **kwargs))
        print(f"done: {rows[-1]['case']}", file=sys.stderr, flush=True)
    print("| case | delivered / expected (cases rejected cleanly for hostile input) | duplicates | result |")
    print("|---|---|---|---|")
    for r in rows:
        extra = " (final metrics equal to an uninterrupted run)" if r.get("equal") else ""
        print(f"| {r['case']} | {r['stored']} / {r['expected']}{extra} | {r['duplicates']} | "
              f"{'ok' if r['ok'] else 'FAILED'} |")


if __name__ == "__main__":
    main()
