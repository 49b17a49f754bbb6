"""The sweep figures stay readable at any sweep size (no training: synthetic histories and a
synthetic Optuna study): the legend lies inside the saved image with at most 10 entries, and the
plot keeps at least half of the image's height."""
from __future__ import annotations

import math
import random

import matplotlib
import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from gradsweep.labels import shorten, trial_label
from gradsweep.report.figures import HIGHLIGHT, draw_bands
from gradsweep.sweep.optuna_loop import optuna_figure

pytestmark = pytest.mark.unit

matplotlib.use("Agg")
N = 30  # the trials of sweeps/lr_layers_clip.yaml


def drawn(fig):
    """(image box as saved with bbox_inches="tight" and as saved with fixed margins, renderer)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans), fig.bbox, renderer


def assert_legible(fig, image, renderer, entries_max=10):
    """The legend inside ``image`` (display coordinates) and short; every axes at least half as high."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "a legend names the best configurations"
    for legend in legends:
        box = legend.get_window_extent(renderer)
        inside = image.x0 - 1 <= box.x0 and box.x1 <= image.x1 + 1 and image.y0 - 1 <= box.y0 and box.y1 <= image.y1 + 1
        assert inside, (box, image)
        assert len(legend.get_texts()) <= entries_max
        for text in legend.get_texts():  # labels with short values: no 16-digit floats
            assert max(len(w) for w in text.get_text().split()) <= 24, text.get_text()
    for ax in fig.axes:  # the plot and the colorbar, their labels included
        box = ax.get_tightbbox(renderer)
        assert image.x0 - 1 <= box.x0 and box.x1 <= image.x1 + 1, (ax, box, image)
    plot = max(fig.axes, key=lambda ax: ax.get_window_extent(renderer).width)  # not the colorbar
    assert plot.get_window_extent(renderer).height >= 0.5 * image.height


def params(rng: random.Random) -> dict:
    return {"optimizer.lr": 10 ** rng.uniform(-3, 0), "model.num_layers": rng.randint(1, 3),
            "clip.max_norm": 10 ** rng.uniform(-1, 2)}


@pytest.mark.parametrize("seed", [0, 1])
def test_sweep_band_figure_of_30_configurations(seed):
    rng = random.Random(seed)
    curves, scores = {}, {}
    for _ in range(N):
        label = " ".join(f"{k}={v}" for k, v in params(rng).items())
        steps = list(range(250))
        med = [math.exp(rng.gauss(2, 1)) for _ in steps]
        curves[label] = (steps, med, [m * 0.5 for m in med], [m * 2 for m in med])
        scores[label] = rng.random() if rng.random() > 0.2 else math.nan  # some diverged: no score
    fig = draw_bands(curves, "lr_layers_clip: grad_norm/total (before clipping)", "global gradient L2 norm", scores)
    _, image, renderer = drawn(fig)  # saved with fixed margins
    assert_legible(fig, image, renderer)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    best = sorted((v, k) for k, v in scores.items() if not math.isnan(v))[-1][1]
    assert texts[0].replace("\n", " ").startswith(f"1. {shorten(best)}")  # the best named first
    assert texts[-1] == f"{N - HIGHLIGHT} others (faint)"
    assert len(fig.axes) == 2  # the plot and the colorbar of the objective
    matplotlib.pyplot.close(fig)


def test_few_configurations_keep_one_entry_each():
    curves = {f"clip.max_norm={v}": ([0, 1, 2], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) for v in (1, 5)}
    fig = draw_bands(curves, "t", "y", {"clip.max_norm=1": 0.5, "clip.max_norm=5": 0.7})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(curves)
    matplotlib.pyplot.close(fig)


def test_optuna_intermediate_values_of_30_trials():
    rng = random.Random(0)
    study = optuna.create_study(direction="maximize")
    dists = {"optimizer.lr": FloatDistribution(1e-3, 1, log=True), "model.num_layers": IntDistribution(1, 3),
             "clip.max_norm": FloatDistribution(0.1, 100, log=True)}
    for number in range(N):
        pruned = number >= 10 and rng.random() < 0.6
        evals = {step: rng.random() for step in range(24, 250 if not pruned else 75, 25)}
        study.add_trial(create_trial(params=params(rng), distributions=dists, intermediate_values=evals,
                                     state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                                     value=None if pruned else max(evals.values())))
    fig = optuna_figure(study, "intermediate_values")
    image, _, renderer = drawn(fig)  # save_figures saves with bbox_inches="tight"
    assert_legible(fig, image, renderer)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    best = study.best_trial
    assert texts[0].replace("\n", " ").startswith(f"1. {trial_label(best.number, best.params)}")
    matplotlib.pyplot.close(fig)
