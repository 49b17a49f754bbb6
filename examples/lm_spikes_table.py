"""The lm_spikes study's table from a store: per clipping rule and learning rate, over the seeds,
the loss spikes (steps whose training loss is over 1.5x the median of the 20 before it, read from each
run's dense history), the final dev loss and perplexity as `median [min-max]`, the runs that diverged
(FAILED), and per rule the largest learning rate at which every seed finished with a dev loss below
a uniform guess (ln 98 = 4.585).

    PYTHONPATH=examples python src/train.py -m experiment=lm_spikes
    python examples/lm_spikes_table.py [--tracking-uri sqlite:///mlruns/mlflow.db]
"""
from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict

import numpy as np
from mlflow.tracking import MlflowClient

import gradsweep

UNIFORM = math.log(98)
RULES = ("none", "norm", "zclip", "adagc")


def spikes(loss: np.ndarray, factor: float = 1.5, window: int = 20) -> int:
    loss = loss[np.isfinite(loss)]
    return int(sum(loss[t] > factor * np.median(loss[t - window:t]) for t in range(window, len(loss))))


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.3f}" if len(values) == 1 else f"{med:.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--experiment", default="gradsweep")
    args = ap.parse_args()
    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.params.get("model._target_") == "gradsweep_examples.chargpt.CharGPT"]
    cells: dict[tuple[str, float], list] = defaultdict(list)
    for r in runs:
        cells[(r.data.params["clip.name"], float(r.data.params["optimizer.lr"]))].append(r)
    print(f"{len(runs)} runs of the lm_spikes model.\n")
    print("| rule | lr | seeds | loss spikes per run | diverged | final dev loss | dev perplexity |")
    print("|---|---|---|---|---|---|---|")
    stable: dict[str, float] = {}
    for rule in RULES:
        for lr in sorted({lr for (r, lr) in cells if r == rule}):
            group = cells[(rule, lr)]
            counts, dev = [], []
            for r in group:
                frame = gradsweep.history(r.info.run_id, tracking_uri=args.tracking_uri)
                counts.append(spikes(frame["train/loss"].to_numpy(dtype=float)))
                if r.info.status == "FINISHED":
                    hist = sorted(client.get_metric_history(r.info.run_id, "dev/loss"), key=lambda m: m.step)
                    dev.append(hist[-1].value)
            failed = sum(r.info.status != "FINISHED" for r in group)
            if not failed and dev and max(dev) < UNIFORM:
                stable[rule] = max(stable.get(rule, 0.0), lr)
            print(f"| {rule} | {lr:g} | {len(group)} | {fmt([float(c) for c in counts])} | {failed} | {fmt(dev)} | "
                  f"{fmt([math.exp(d) for d in dev])} |")
    print("\n| rule | largest lr, every seed below a uniform guess |")
    print("|---|---|")
    for rule in RULES:
        print(f"| {rule} | {stable[rule]:g} |" if rule in stable else f"| {rule} | none of the ladder |")


if __name__ == "__main__":
    main()
