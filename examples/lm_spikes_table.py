"""The lm_spikes study's table from a store: per clipping rule and learning rate, over the seeds,
the loss spikes (steps whose training loss is over 1.5x the median of the 20 before it, read from each
run's dense history), the final dev loss and perplexity as `median [min-max]`, the runs that diverged
(FAILED), and per rule the largest learning rate at which every seed finished with a dev loss below
a uniform guess (ln 98 = 4.585).

    PYTHONPATH=examples python src/train.py -m experiment=lm_spikes
    python examples/lm_spikes_table.py [--tracking-uri sqlite:///mlruns/mlflow.db] [--figure lm_spikes.png]
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


def draw(curves: dict[str, list[tuple[float, list[float]]]], path: str) -> None:
    """Final dev loss against the learning rate, per rule: the median over seeds, the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for rule, points in curves.items():
        points = [(lr, dev) for lr, dev in sorted(points) if dev]
        if not points:
            continue
        lrs = [lr for lr, _ in points]
        line, = ax.plot(lrs, [statistics.median(d) for _, d in points], marker="o", label=rule)
        ax.fill_between(lrs, [min(d) for _, d in points], [max(d) for _, d in points], color=line.get_color(),
                        alpha=0.2)
    ax.axhline(UNIFORM, color="grey", linestyle=":", label="uniform guess (ln 98)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (AdamW)")
    ax.set_ylabel("final dev loss (nats per character)")
    ax.set_title("lm_spikes: char-level GPT on stdlib sources, median and min-max over seeds", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    ap.add_argument("--experiment", default="gradsweep")
    ap.add_argument("--figure", help="also draw the final dev loss per rule against the learning rate here (PNG)")
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
    curves: dict[str, list[tuple[float, list[float]]]] = defaultdict(list)
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
            curves[rule].append((lr, dev))
            if not failed and dev and max(dev) < UNIFORM:
                stable[rule] = max(stable.get(rule, 0.0), lr)
            print(f"| {rule} | {lr:g} | {len(group)} | {fmt([float(c) for c in counts])} | {failed} | {fmt(dev)} | "
                  f"{fmt([math.exp(d) for d in dev])} |")
    if args.figure:
        draw(curves, args.figure)
    print("\n| rule | largest lr, every seed below a uniform guess |")
    print("|---|---|")
    for rule in RULES:
        print(f"| {rule} | {stable[rule]:g} |" if rule in stable else f"| {rule} | none of the ladder |")


if __name__ == "__main__":
    main()
