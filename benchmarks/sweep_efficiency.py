"""Best dev accuracy reached vs wall time on the ``lr_layers_clip`` space, three ways:

  (a) grid: Hydra's basic sweeper over a k x k x k grid of the same space (log-spaced lr and clip
      norm at the centres of k equal log-bins, layers 1..3), every job run to the end;
  (b) TPE: ``+sweep=lr_layers_clip hydra/sweeper/pruner=none``, as many trials as the grid has jobs;
  (c) TPE + pruning: ``+sweep=lr_layers_clip`` (median pruner), the same budget.

Each method is one ``python src/train.py -m ...`` process, run as a user would, in its own temp
dir with its own MLflow store and Optuna storage. The clock starts when the process starts, so
start-up is in every number. "best @ t" is the best ``best/dev_acc`` among runs finished by t
(MLflow end time), at fractions of the slowest method's wall time. "steps" is the optimizer
steps all jobs trained (pruned jobs stop early); "CPU s" the CPU time of the sweep's processes,
which other load on the machine distorts less than wall time; "load" the 1-minute load average
around the run (on a shared machine, compare wall times only at similar load). Prints a
Markdown table.

    python benchmarks/sweep_efficiency.py                         # 3x3x3 grid = 27 jobs per method
    python benchmarks/sweep_efficiency.py --grid 2 --extra model.init=xavier optimizer.momentum=0.9
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "src" / "train.py"
LEAN = ["tracking.log_figures=false", "tracking.log_checkpoints=false"]  # the same for every method


def log_centres(low: float, high: float, k: int) -> list[float]:
    a, b = math.log10(low), math.log10(high)
    return [round(10 ** (a + (i + 0.5) * (b - a) / k), 6) for i in range(k)]


def run(name: str, args: list[str], workdir: Path) -> dict:
    store = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    (workdir / "mlruns").mkdir(parents=True)
    MlflowClient(store).search_experiments()  # create the store's tables outside the timed run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread each, no spinning threads under load
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    res = subprocess.run([sys.executable, str(TRAIN), "-m", *args, *LEAN, f"tracking.uri={store}"], cwd=workdir,
                         capture_output=True, text=True, env=env)
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    children = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if "mlflow.parentRunId" in r.data.tags]
    finished, steps = [], 0
    for r in children:
        evals = client.get_metric_history(r.info.run_id, "dev/acc")
        steps += max((m.step for m in evals), default=-1) + 1
        if r.info.status == "FINISHED" and "best/dev_acc" in r.data.metrics:
            finished.append(((r.info.end_time / 1000) - t0, r.data.metrics["best/dev_acc"]))
    states = [r.data.tags.get("optuna.state", r.info.status) for r in children]
    return {"name": name, "wall": wall, "cpu": cpu, "load": (load0 + os.getloadavg()[0]) / 2, "jobs": len(children),
            "finished": sorted(finished), "steps": steps,
            "pruned": states.count("PRUNED"), "failed": sum(s in ("FAIL", "FAILED") for s in states)}


def best_by(result: dict, t: float) -> str:
    scores = [acc for end, acc in result["finished"] if end <= t]
    return f"{max(scores):.3f}" if scores else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=3, help="points per dimension (k); jobs per method = k^3")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides added to every job of every method")
    ap.add_argument("--only", nargs="*", default=["grid", "tpe", "tpe_pruned"])
    opts = ap.parse_args()
    k = opts.grid
    n = k ** 3
    lrs, clips = log_centres(0.001, 1.0, k), log_centres(0.1, 100.0, k)
    layers = [round(1 + i * 2 / max(k - 1, 1)) for i in range(k)]
    methods = {
        "grid": ["trainer.eval_every_steps=25",  # the evaluation schedule lr_layers_clip sets
                 f"optimizer.lr={','.join(map(str, lrs))}",
                 f"model.num_layers={','.join(map(str, sorted(set(layers))))}",
                 f"clip.max_norm={','.join(map(str, clips))}"],
        "tpe": ["+sweep=lr_layers_clip", "hydra/sweeper/pruner=none", f"hydra.sweeper.n_trials={n}",
                "hydra.sweeper.figures=false"],
        "tpe_pruned": ["+sweep=lr_layers_clip", f"hydra.sweeper.n_trials={n}", "hydra.sweeper.figures=false"],
    }
    labels = {"grid": f"(a) grid {k}x{k}x{k}, basic sweeper", "tpe": "(b) TPE, no pruning",
              "tpe_pruned": "(c) TPE + median pruning"}
    results = []
    with tempfile.TemporaryDirectory(prefix="gradsweep-bench-") as tmp:
        for key in opts.only:
            print(f"running {labels[key]} ...", file=sys.stderr, flush=True)
            results.append(run(labels[key], [*methods[key], *opts.extra], Path(tmp) / key))
    longest = max(r["wall"] for r in results)
    marks = [longest * f for f in (0.25, 0.5, 0.75, 1.0)]
    print(f"\nlr_layers_clip space (lr 1e-3..1 log, layers 1-3, clip norm 0.1..100 log), {n} jobs per method"
          + (f", extra: {' '.join(opts.extra)}" if opts.extra else "") + f"; {os.cpu_count()} CPU cores\n")
    head = ["method", "jobs", "pruned", "failed", "steps", "CPU s", "wall s", "load",
            *[f"best @ {t:.0f} s" for t in marks]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(f"| {r['name']} | {r['jobs']} | {r['pruned']} | {r['failed']} | {r['steps']} | {r['cpu']:.0f} | "
              f"{r['wall']:.0f} | {r['load']:.1f} | "
              + " | ".join(best_by(r, t) for t in marks) + " |")


if __name__ == "__main__":
    main()
