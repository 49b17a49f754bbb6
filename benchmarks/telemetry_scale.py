"""What per-step telemetry costs at scale: a model with --params parameter tensors (>= 100), runs of
10k and 100k steps, recorded exactly as a job records them, on the embedded sqlite store.

    .venv/bin/python benchmarks/telemetry_scale.py [--params 120] [--steps 10000,100000] [--step-ms 1,0.5]

Each case opens a run as a job does (`gradsweep.track.mlflow_run.open_run`: a run journal on local disk
and the real delivery process) and drives the run-logger seam directly (the benchmark models a
job's telemetry, not its compute): `define_steps` with the contract's names, then one float32 row
per step through `log_steps`, with the same in-memory history a job keeps (`TeeSink(HistorySink, run)`),
paced at --step-ms per step (a realistic small-model step), values drawn around 1 with one spike.
Then it ends the run as a job does (`close_run`) and measures:

  journal B/value   bytes of the run's journal per recorded value (steps.bin + journal.jsonl)
  step us           the training thread's cost per step: the log_steps call (history + journal)
  delivered after   seconds from the last step until the run was FINISHED on the store
  store MB          growth of the sqlite file of the tracking store (MLflow's metric rows)
  MLflow points     points of grad_norm/total and of one grad_norm/<param> in MLflow
  dense MB          the telemetry/ Parquet artifacts (every step), and whether gradsweep.history
                    returned every step bit for bit and MLflow kept the spike's exact step and value
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def names(params: int) -> list[str]:
    return ["train/loss", "train/acc", "grad_norm/total", "grad_norm/total_clipped", "clip/coef",
            *(f"grad_norm/blocks.{i // 4}.{['attn', 'mlp', 'ln1', 'ln2'][i % 4]}.weight" for i in range(params))]


def one_case(root: Path, params: int, steps: int, step_ms: float) -> dict:
    import numpy as np
    from mlflow.tracking import MlflowClient

    import gradsweep
    from gradsweep.track.settings import TrackingConfig
    from gradsweep.track.closing import close_run
    from gradsweep.track.mlflow_run import open_run
    from gradsweep.train.sinks import HistorySink, TeeSink

    folder = root / f"case-{params}-{steps}"
    folder.mkdir()
    db = folder / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # the store's schema, before the measurement
    size0 = db.stat().st_size
    tracking = TrackingConfig(uri=uri, experiment_name="scale", delivery_timeout_s=120.0)
    run = open_run(tracking, f"{params} tensors x {steps} steps", {"bench": "telemetry_scale"})
    cols = names(params)
    history = HistorySink()
    sink = TeeSink(history, run)
    sink.define_steps(cols, steps)
    rng = np.random.default_rng(0)
    spike = steps * 2 // 3
    index = np.empty(1, np.int64)
    costs = np.empty(steps)
    period = step_ms / 1000.0
    t0 = time.monotonic()
    for step in range(steps):
        row = rng.lognormal(0.0, 0.2, size=(1, len(cols))).astype(np.float32)  # the step's transfer
        if step == spike:
            row[0, 2] = 2600.0
        index[0] = step
        c = time.perf_counter()
        sink.log_steps(index, row)
        costs[step] = time.perf_counter() - c
        wait = t0 + (step + 1) * period - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    trained = time.monotonic()
    journal_bytes = sum(f.stat().st_size for f in run.journal.folder.iterdir() if f.is_file())
    ok = close_run(run.journal, "FINISHED", 120.0)
    drained = time.monotonic() - trained
    client = MlflowClient(uri)
    run_id = run.journal.run_id
    total = client.get_metric_history(run_id, "grad_norm/total")
    one = client.get_metric_history(run_id, cols[7])
    frame = gradsweep.history(run_id, tracking_uri=uri)
    exact = frame.shape == (steps, len(cols)) and np.array_equal(frame.to_numpy(), history._values[:steps])
    kept = (spike, 2600.0) in [(m.step, m.value) for m in total]
    dense = sum(p.stat().st_size for p in (folder / "artifacts").glob("**/telemetry/*.parquet"))
    return {"params": params, "steps": steps, "values": steps * len(cols),
            "journal_b_per_value": journal_bytes / (steps * len(cols)),
            "step_us_median": float(np.median(costs)) * 1e6, "step_us_p99": float(np.quantile(costs, 0.99)) * 1e6,
            "delivered_after_s": drained, "finished": ok and client.get_run(run_id).info.status == "FINISHED",
            "store_mb": (db.stat().st_size - size0) / 1e6, "mlflow_total": len(total), "mlflow_param": len(one),
            "dense_mb": dense / 1e6, "exact": exact, "spike_kept": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=120)
    ap.add_argument("--steps", default="10000,100000")
    ap.add_argument("--step-ms", default="1,0.5", help="pace per step, one per --steps entry")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    paces = [float(s) for s in args.step_ms.split(",")]
    paces += paces[-1:] * (len(steps) - len(paces))
    root = Path(tempfile.mkdtemp(prefix="gradsweep-scale-"))
    cwd = os.getcwd()
    os.chdir(root)  # the spool lands beside the store, as in a job
    rows = []
    try:
        for n, pace in zip(steps, paces, strict=True):
            rows.append(one_case(root, args.params, n, pace))
            print(f"  done: {n} steps", file=sys.stderr, flush=True)
    finally:
        os.chdir(cwd)
        shutil.rmtree(root, ignore_errors=True)
    head = ("tensors", "steps", "values", "journal B/value", "step us (median / p99)", "delivered after s",
            "store MB", "MLflow points total / param", "dense MB", "history exact", "spike kept")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['params']} | {r['steps']:,} | {r['values']:,} | {r['journal_b_per_value']:.2f} | "
              f"{r['step_us_median']:.1f} / {r['step_us_p99']:.1f} | {r['delivered_after_s']:.2f} | "
              f"{r['store_mb']:.1f} | {r['mlflow_total']} / {r['mlflow_param']} | {r['dense_mb']:.1f} | "
              f"{'yes' if r['exact'] else 'NO'} | {'yes' if r['spike_kept'] else 'NO'} |")


if __name__ == "__main__":
    main()
