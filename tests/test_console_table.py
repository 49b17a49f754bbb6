"""The table a sweep ends with on the console: summary.md's numbers, readable at any sweep size."""
from pathlib import Path
from types import SimpleNamespace

from gradsweep.report.summary import CONSOLE_BEST, console_table, group_runs

import pytest

pytestmark = pytest.mark.unit


def run(lr: float, seed: int, acc: float, status: str = "FINISHED", verdict: str = "ok"):
    metrics = {"best/dev_acc": acc, "test/acc": acc - 0.01,
               "health/peak_grad_norm": 10 * lr} if status == "FINISHED" else {}
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=f"{lr}-{seed}", run_name=""),
                           data=SimpleNamespace(params={"optimizer.lr": repr(lr), "trainer.seed": str(seed)},
                                                metrics=metrics, tags={"grad_health": verdict}))


def test_one_row_per_configuration_with_the_spread_over_seeds():
    runs = [run(0.1, s, 0.5 + s / 10) for s in range(3)] + [run(100.0, s, 0, "FAILED", "nonfinite") for s in range(3)]
    lines = console_table(group_runs(runs), Path("multirun/x/summary.csv")).splitlines()
    assert lines[0].startswith("Sweep summary (2 configurations, median [min-max] over seeds")
    assert lines[1].split() == ["configuration", "finished", "peak", "grad", "norm", "grad_health", "best", "dev",
                                "acc", "test", "acc"]
    assert lines[3].split() == ["optimizer.lr=0.1", "3/3", "1", "[1-1]", "ok", "3/3", "0.6", "[0.5-0.7]", "0.59",
                                "[0.49-0.69]"]
    assert lines[4].split() == ["optimizer.lr=100", "0/3", "-", "nonfinite", "3/3", "-", "-"]
    assert len(lines) == 5


def test_a_large_sweep_shows_its_best_and_says_where_the_rest_are():
    lrs = [0.0123456789 * (i + 1) for i in range(40)]  # Optuna-style floats: shown to 3 significant digits
    runs = [run(lr, 0, acc=i / 100) for i, lr in enumerate(lrs)]
    text = console_table(group_runs(runs), Path("multirun/x/summary.csv"))
    lines = text.splitlines()
    assert len(lines) == 3 + CONSOLE_BEST + 1
    assert lines[-1] == "  ... and 30 more configurations: multirun/x/summary.csv"
    shown = [line.split()[0] for line in lines[3:-1]]
    assert shown == [f"optimizer.lr={lr:.3g}" for lr in lrs[::-1][:CONSOLE_BEST]]  # best dev acc first
    assert max(len(line) for line in lines) < 120


def test_a_configuration_swept_over_seeds_alone_is_not_named_by_one_seed():
    runs = [run(0.1, s, 0.5) for s in range(3)]
    for r in runs:
        r.data.params = {"trainer.seed": r.data.params["trainer.seed"]}
        r.data.tags["gradsweep.overrides"] = f"clip=none trainer.seed={r.data.params['trainer.seed']}"
    (config,) = group_runs(runs)
    assert config.label == "clip=none" and len(config.runs) == 3
