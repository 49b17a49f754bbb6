"""How far one tracking server goes: sustained ingestion of one `mlflow server` through the product's
own delivery path, for N concurrent jobs, and where delivery falls behind training.

    .venv/bin/python benchmarks/server_capacity.py [--workers 1,2,4,8] [--seconds 20]
        [--backends postgres,sqlite] [--steps-per-s 20] [--params 96] [--drain-s 30]

One `mlflow server` per backend, started by `gradsweep.track.server.MlflowServer` (the product's
command): PostgreSQL (a real server from `tests/postgres.py`, as in docker-compose.yml) or sqlite.
For each N, N writer processes each open a run exactly as a job does (`gradsweep.track.mlflow_run.open_run`:
a run journal on disk plus the real delivery process `python -m gradsweep.track.delivery <spool>
--owner-pid <pid>`, one per job, sending with `log_batch`), wait until their delivery process has
created the run, then append one step of ~100 values (`grad_norm/<param>` for --params parameters +
the totals, `clip/coef`, `train/loss`, `train/acc`: one binary step record, as a job's `log_steps`)
--steps-per-s times a second for --seconds; then
they close the run as a job does (`close_run`: wait for their delivery process, at most --drain-s).

Measured from the journals' own delivery offsets (state.json), sampled once a second:
  written pts/s    what the N writers appended (the training side)
  delivered pts/s  steps whose values reached the server (sampled to MLflow's bound, every step in
                   the dense history at the end), in values/s, over the window after a short warm-up
  backlog / lag    values written but not yet delivered when training ends, and how far delivery is
                   behind then (seconds of training)
  drained          seconds after training ended until every run was complete on the server
  arrived          every run's dense history (gradsweep.history) has every written step, and its
                   `grad_norm/total` in MLflow at most tracking.max_points points
and CPU shares (per cent of one core) of the server (+ PostgreSQL), the delivery processes, the
writers, and the whole machine (100 % x cores = saturated).

The writers sleep between steps (they model the journal traffic of a job, not its compute): real
jobs also burn a core each on training, so on a small machine they leave less CPU to the server than
here. Everything (writers, delivery processes, server, PostgreSQL) shares this machine's cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from gradsweep.track.server import stat_fields  # noqa: E402  (light: no MLflow)


# ------------------------------------------------------------------------------ writer process
def writer(args: argparse.Namespace) -> None:
    """One job's journal traffic: open a run as a job does, wait for 'go' on stdin, write, close."""
    from gradsweep.track.settings import TrackingConfig
    from gradsweep.track.closing import close_run
    from gradsweep.track.mlflow_run import open_run
    from gradsweep.track.worker import DeliveryWorker

    tracking = TrackingConfig(uri=args.uri, experiment_name=args.experiment, spool_dir=args.spool,
                              delivery_timeout_s=args.drain_s)
    run = open_run(tracking, f"w{args.index}", {"bench": "server_capacity"})
    worker_pid = DeliveryWorker._workers[Path(args.spool).resolve()].pid
    deadline = time.monotonic() + 120
    while run.journal.run_id is None and time.monotonic() < deadline:  # the delivery process created it
        run.journal._poll_state()
        time.sleep(0.1)
    import numpy as np

    names = ["train/loss", "train/acc", "grad_norm/total", "grad_norm/total_clipped", "clip/coef"]
    names += [f"grad_norm/p{i:03d}" for i in range(args.params)]
    run.define_steps(names, args.planned_steps or int(args.seconds * args.steps_per_s))  # as a job does
    print(json.dumps({"ready": True, "folder": str(run.journal.folder), "worker_pid": worker_pid,
                      "run_id": run.journal.run_id, "width": run.journal.schema.width}), flush=True)
    sys.stdin.readline()  # go
    t0 = time.monotonic()
    period = 1.0 / args.steps_per_s
    step = 0
    index = np.empty(1, np.int64)
    base = 0.5 + (np.arange(len(names)) % 100) / 100
    while True:
        due = t0 + step * period
        if due >= t0 + args.seconds:
            break
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        index[0] = step
        run.log_steps(index, (base + (step * 7 % 100) / 100).astype(np.float32)[None, :])
        step += 1
    trained = time.monotonic()
    run.journal.flush()
    ok = close_run(run.journal, "FINISHED", args.drain_s)
    print(json.dumps({"steps": step, "values": len(names), "train_s": trained - t0,
                      "drain_s": time.monotonic() - trained, "delivered": ok}), flush=True)


# ------------------------------------------------------------------------------ measuring
class JournalProgress:
    """Delivered steps of one journal: its state's offset of step records whose headline metrics were
    sent (sampled to MLflow; a step is counted once its window is complete)."""

    def __init__(self, folder: Path, width: int):
        self.folder, self.width = folder, width
        self.lines = 0  # steps delivered
        self.done = False

    def sample(self) -> None:
        try:
            state = json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return
        self.done = bool(state.get("done"))
        self.lines = max(self.lines, (state.get("steps") or {}).get("sent_head", 0) // self.width)


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def _pids_where(field: int, value: int) -> list[int]:
    """Processes whose ``/proc/<pid>/stat`` field (after the name: 1 ppid, 3 session) is ``value``."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(stat_fields(p)[field]) == value:
                out.append(int(p))
        except (OSError, IndexError, ValueError):
            pass
    return out


def session_pids(sid: int) -> list[int]:
    return _pids_where(3, sid)


def children_of(pid: int) -> list[int]:
    return [pid, *_pids_where(1, pid)]


def one_case(uri: str, server_pids, n: int, args: argparse.Namespace, root: Path, label: str) -> dict:
    from mlflow.tracking import MlflowClient

    spool = root / f"spool-{label}-{n}"
    experiment = f"capacity-{label}-{n}"
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, "--_writer", "--uri", uri, "--experiment", experiment, "--spool", str(spool),
               "--index", str(i), "--seconds", str(args.seconds), "--steps-per-s", str(args.steps_per_s),
               "--params", str(args.params), "--drain-s", str(args.drain_s), "--planned-steps", str(args.planned_steps)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root))
    ready = [json.loads(p.stdout.readline()) for p in procs]
    journals = [JournalProgress(Path(r["folder"]), r["width"]) for r in ready]
    delivery_pids = [r["worker_pid"] for r in ready]
    writer_pids = [p.pid for p in procs]
    for j in journals:  # whatever was delivered before training (nothing: params come from the job only)
        j.sample()
    base = [j.lines for j in journals]
    tick = os.sysconf("SC_CLK_TCK")
    cpu0 = (cpu_ticks(server_pids()), cpu_ticks(delivery_pids), cpu_ticks(writer_pids), machine_ticks())
    t0 = time.monotonic()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    warm = min(3.0, args.seconds / 4)
    marks = {}
    while time.monotonic() < t0 + args.seconds:
        time.sleep(min(1.0, max(0.0, t0 + args.seconds - time.monotonic())))
        for j in journals:
            j.sample()
        elapsed = time.monotonic() - t0
        if "warm" not in marks and elapsed >= warm:
            marks["warm"] = (elapsed, sum(j.lines for j in journals))
    t_end = time.monotonic()
    for j in journals:
        j.sample()
    delivered_end = sum(j.lines - b for j, b in zip(journals, base, strict=True))
    written_end = int((t_end - t0) * args.steps_per_s)
    cpu1 = (cpu_ticks(server_pids()), cpu_ticks(delivery_pids), cpu_ticks(writer_pids), machine_ticks())
    window = t_end - t0
    lags = [max(0, written_end - j.lines) / args.steps_per_s for j in journals]  # steps behind, in seconds
    results = [json.loads(p.stdout.readline() or "{}") for p in procs]  # after close_run (drain)
    for p in procs:
        p.wait()
    for pid in delivery_pids:  # a delivery process still going after its job gave up waiting
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    steps = [r.get("steps", 0) for r in results]
    values = results[0].get("values", args.params + 5) if results else args.params + 5
    written = sum(steps) * values
    warm_t, warm_lines = marks.get("warm", (0.0, 0))
    delivered_rate = (delivered_end - warm_lines) * values / max(1e-9, window - warm_t)
    import gradsweep

    client = MlflowClient(uri)
    arrived = 0
    for r, s in zip(ready, steps, strict=True):  # every step in the dense history, the MLflow metric within its bound
        try:
            dense = list(gradsweep.history(r["run_id"], tracking_uri=uri).index) if r["run_id"] else []
            points = len(client.get_metric_history(r["run_id"], "grad_norm/total")) if r["run_id"] else 0
        except Exception:  # no dense history, or the server still too busy to answer: not arrived
            dense, points = [], 0
        arrived += dense == list(range(s)) and 0 < points <= 2500
    cores = os.cpu_count() or 1
    busy = (cpu1[3][0] - cpu0[3][0]) / max(1, cpu1[3][1] - cpu0[3][1]) * 100 * cores
    pct = [(cpu1[k] - cpu0[k]) / tick / window * 100 for k in range(3)]
    shutil.rmtree(spool, ignore_errors=True)
    return {"n": n, "written_rate": written / window, "delivered_rate": delivered_rate,
            "backlog": written - delivered_end * values, "lag": max(lags),
            "drain": max(r.get("drain_s", float("nan")) for r in results),
            "complete": all(r.get("delivered") for r in results), "arrived": arrived,
            "cpu": pct, "busy": busy}


def run_backend(backend: str, args: argparse.Namespace) -> list[dict]:
    from gradsweep.track.server import MlflowServer, mlflow_executable, mlflow_server_command

    class Server(MlflowServer):
        """The product's server command, with --server-workers web workers (MlflowServer uses 1)."""

        def command(self) -> list[str]:
            return mlflow_server_command(executable=mlflow_executable(), host="127.0.0.1", port=self.port,
                                         workers=args.server_workers, backend_store_uri=self.backend,
                                         artifacts_destination=self.artifacts, app_name=self.app_name)

    root = Path(tempfile.mkdtemp(prefix=f"gradsweep-cap-{backend}-"))
    pg = None
    server = None
    try:
        if backend == "postgres":
            sys.path.insert(0, str(ROOT / "tests"))
            from postgres import PostgresServer

            try:
                pg = PostgresServer(database="mlflow").start()
            except BaseException as e:  # pytest.skip: no server binaries
                print(f"postgres: not run ({type(e).__name__}: {e})", file=sys.stderr)
                return []
            server = Server(root, backend=pg.uri.replace("postgresql://", "postgresql+psycopg2://"))
            db_pids = lambda: children_of(pg.proc.pid)  # noqa: E731
        else:
            server = Server(root)
            db_pids = lambda: []  # noqa: E731
        t = time.monotonic()
        server.start(timeout=180)
        print(f"{backend}: server up in {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        pids = lambda: session_pids(server.proc.pid) + db_pids()  # noqa: E731
        rows = []
        for n in args.workers:
            row = one_case(server.uri, pids, n, args, root, backend)
            row["backend"] = backend
            rows.append(row)
            print(f"{backend} N={n}: written {row['written_rate']:.0f}/s delivered {row['delivered_rate']:.0f}/s "
                  f"lag {row['lag']:.1f} s drain {row['drain']:.1f} s", file=sys.stderr, flush=True)
        return rows
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8", help="numbers of concurrent jobs, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="training window per case")
    ap.add_argument("--backends", default="postgres,sqlite")
    ap.add_argument("--steps-per-s", type=float, default=20.0, help="steps a second each job writes")
    ap.add_argument("--params", type=int, default=96, help="parameters of the model (grad_norm/<param> each)")
    ap.add_argument("--planned-steps", type=int, default=100_000,
                    help="the run's planned length (sets its MLflow windows): the jobs model --seconds of a run "
                         "this long; 0 = just --seconds of steps (a short run: every step goes to MLflow)")
    ap.add_argument("--server-workers", type=int, default=1, help="`mlflow server --workers` (the product runs 1)")
    ap.add_argument("--drain-s", type=float, default=30.0, help="how long a job waits for its delivery at the end")
    # the writer process (internal)
    ap.add_argument("--_writer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--experiment", help=argparse.SUPPRESS)
    ap.add_argument("--spool", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._writer:
        writer(args)
        return
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        rows += run_backend(backend, args)
    values = args.params + 5
    cores = os.cpu_count()
    planned = f"of a {args.planned_steps:,}-step run " if args.planned_steps else ""
    print(f"One `mlflow server` (--workers {args.server_workers}), jobs writing {values} values/step at "
          f"{args.steps_per_s:g} steps/s each ({values * args.steps_per_s:.0f} points/s per job) for "
          f"{args.seconds:g} s {planned}, each with its own delivery "
          f"process (log_batch, <= 1000 values/request). This machine: {cores} cores shared by the writers, the "
          f"delivery processes, the server and PostgreSQL; writers sleep between steps (real jobs would also "
          f"train).\n")
    print("| backend | jobs | written pts/s | delivered pts/s | delivered / written | backlog at end (pts) "
          "| lag at end (s) | drained after (s) | runs complete | CPU % server+db / delivery / writers / machine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        drain = f"{r['drain']:.1f}" if r["complete"] else f"> {args.drain_s:g} (not drained)"
        c = r["cpu"]
        print(f"| {r['backend']} | {r['n']} | {r['written_rate']:.0f} | {r['delivered_rate']:.0f} | "
              f"{r['delivered_rate'] / max(1e-9, r['written_rate']) * 100:.0f} % | {r['backlog']:.0f} | "
              f"{r['lag']:.1f} | "
              f"{drain} | {r['arrived']} / {r['n']} | {c[0]:.0f} / {c[1]:.0f} / {c[2]:.0f} / "
              f"{r['busy']:.0f} of {100 * cores} |")


if __name__ == "__main__":
    main()
