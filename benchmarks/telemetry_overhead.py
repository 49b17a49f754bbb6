"""Cost of per-step gradient telemetry and MLflow logging on the default job (SRN, digit-sum, 250 steps).

Prints a table: step time (median and best of interleaved repeats) of
  bare            forward/backward/clip/step only (no norms, no host transfer, no logging)
  telemetry       + per-parameter norms (one fused kernel), one host transfer per step, in-memory sink
  + embedded      + the run journal, delivered by the delivery process to the embedded sqlite store
  + server        + the same to a real `mlflow server` on 127.0.0.1
  (the last column: time to deliver what was still buffered when training ended; the run is open
   meanwhile but the next job can already be starting in a sweep worker)
  naive embedded  one synchronous log_metric call per value (the way to avoid), on fewer steps
  naive server    the same against the server
Run: .venv/bin/python benchmarks/telemetry_overhead.py [--repeats 3] [--naive-steps 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from gradsweep.train.clipping import NormClipConfig
from gradsweep.train.data import DigitSumConfig
from gradsweep.train.loop import TrainerConfig
from gradsweep.train.models import SRNConfig
from gradsweep.train.optim import SGDConfig
from gradsweep.train.registry import build
from gradsweep.train.loop import Trainer, batch_loss
from gradsweep.track.server import MlflowServer
from gradsweep.train.sinks import HistorySink, TeeSink
from gradsweep.track.settings import TrackingConfig
from gradsweep.track.mlflow_run import open_run
from gradsweep.track.tracker import Tracker

CFG = TrainerConfig(epochs=50, batch_size=64, reduction="sum", eval_every_steps=100, device="cpu")


HIDDEN = 32  # set by --hidden


def setup():
    torch.manual_seed(0)
    data = build("data", DigitSumConfig())
    model = build("model", SRNConfig(input_size=HIDDEN, hidden_size=HIDDEN), data, data.num_classes)
    return data, model, build("optimizer", SGDConfig(lr=0.2), model.parameters())


def bare(steps: int | None = None) -> float:
    """The same batches and updates with nothing recorded."""
    data, model, opt = setup()
    gen = torch.Generator().manual_seed(0)
    n, bs = len(data.train), CFG.batch_size
    total = steps or CFG.epochs * -(-n // bs)
    t0, step = time.perf_counter(), 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            if step == total:
                break
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=False)
            loss, _ = batch_loss(model(data.train.x[idx]), data.train.y[idx], "cross_entropy", "sum")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
            opt.step()
            step += 1
    return (time.perf_counter() - t0) / total


def with_sink(make_sink) -> tuple[float, float]:
    """(seconds per step while training, seconds to deliver what was still buffered at the end)."""
    data, model, opt = setup()
    sink, close = make_sink()
    trainer = Trainer(model, data, opt, build("clip", NormClipConfig(max_norm=20.0)), CFG,
                      TeeSink(HistorySink(), sink), torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.run()
    t1 = time.perf_counter()
    close()
    return (t1 - t0) / trainer.total_steps, time.perf_counter() - t1


class NaiveSink:
    """One synchronous request per value: what batching avoids."""

    def __init__(self, client, run_id):
        self.client, self.run_id = client, run_id

    def log_metrics(self, step, metrics):
        for k, v in metrics.items():
            self.client.log_metric(self.run_id, k, v, step=step)


def naive(tracker: Tracker, steps: int) -> float:
    data, model, opt = setup()
    run_id = tracker.start_run("naive", {})
    cfg = TrainerConfig(epochs=1, batch_size=max(1, len(data.train) // steps), reduction="sum",
                        eval_every_steps=10**6, device="cpu")
    trainer = Trainer(model, data, opt, build("clip", NormClipConfig(max_norm=20.0)), cfg,
                      NaiveSink(tracker.client, run_id), torch.device("cpu"))
    t0 = time.perf_counter()
    trainer.run()
    tracker.client.set_terminated(run_id, "FINISHED")
    return (time.perf_counter() - t0) / trainer.total_steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=32, help="SRN input and hidden size (default job: 32)")
    args = ap.parse_args()
    global HIDDEN
    HIDDEN = args.hidden
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="gradsweep-bench-"))
    embedded = Tracker(f"sqlite:///{root}/embedded.db", "bench")
    server_proc = MlflowServer(root).start()
    try:
        server = Tracker(server_proc.uri, "bench")

        def mlflow_sink(tracker):
            spool = root / f"spool-{tracker.experiment_id}-{abs(hash(tracker.uri))}"

            def make():  # the journal + delivery process the trainer uses (see gradsweep.track.mlflow_run)
                run = open_run(TrackingConfig(uri=tracker.uri, experiment_name="bench", spool_dir=str(spool)),
                               "bench", {})
                return run, lambda: run.finish("FINISHED")
            journal, close = make()  # start the delivery process before timing (once per process)
            close()
            return make

        rows = {
            "bare": lambda: (bare(), 0.0),
            "telemetry (in-memory sink)": lambda: with_sink(lambda: (HistorySink(), lambda: None)),
            "telemetry + embedded store": lambda: with_sink(mlflow_sink(embedded)),
            "telemetry + mlflow server": lambda: with_sink(mlflow_sink(server)),
        }
        results: dict[str, list] = {name: [] for name in rows}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits every variant alike
            for name, fn in rows.items():
                results[name].append(fn())
        results["naive log_metric, embedded"] = [(naive(embedded, args.naive_steps), 0.0)]
        results["naive log_metric, server"] = [(naive(server, args.naive_steps), 0.0)]
    finally:
        server_proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(t for t, _ in results["bare"])
    base_min = min(t for t, _ in results["bare"])
    print(f"SRN digit-sum, hidden {HIDDEN}, 250 steps, {len(setup()[1].state_dict()) + 5} metrics/step; "
          f"median and best of {args.repeats} interleaved runs; torch threads=1; {os.cpu_count()} cores\n")
    print(f"| {'variant':<28} | {'ms/step':>8} | {'vs bare':>8} | {'best ms':>8} | {'vs bare':>8} "
          f"| {'final flush ms':>14} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 16}|")
    for name, vals in results.items():
        ms = statistics.median(t for t, _ in vals) * 1000
        best = min(t for t, _ in vals) * 1000
        flush = statistics.median(f for _, f in vals) * 1000
        print(f"| {name:<28} | {ms:8.2f} | {ms / (base * 1000) * 100 - 100:+7.1f}% | {best:8.2f} "
              f"| {best / (base_min * 1000) * 100 - 100:+7.1f}% | {flush:14.0f} |")


if __name__ == "__main__":
    main()
