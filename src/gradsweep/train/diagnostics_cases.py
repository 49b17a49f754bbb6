"""A labelled set of synthetic gradient histories with known verdicts: what the diagnostics are
calibrated and tested on (``tests/test_diagnostics.py``) and what docs/studies.md tabulates.

Each case is a history as the training loop records it (``name -> (steps, values)``) and the
verdict tag a correct diagnosis gives it. Dead units need a model, not a history: they are
checked on a real MLP in the tests and the studies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradsweep.train.sinks import Series


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    expected: str  #: the grad_health tag
    history: dict[str, Series]


def _history(total: np.ndarray, params: dict[str, np.ndarray], coef: np.ndarray | None = None) -> dict[str, Series]:
    steps = list(range(len(total)))
    coef = np.ones(len(total)) if coef is None else coef
    h: dict[str, Series] = {
        "grad_norm/total": (steps, total.tolist()), "grad_norm/total_clipped": (steps, (total * coef).tolist()),
        "clip/coef": (steps, coef.tolist()), "train/loss": (steps, np.ones(len(total)).tolist())}
    for name, values in params.items():
        h[f"grad_norm/{name}"] = (steps, values.tolist())
    return h


def _split(total: np.ndarray) -> dict[str, np.ndarray]:
    """Three parameters sharing the total evenly (each sqrt(1/3) of it)."""
    part = total / np.sqrt(3.0)
    return {"layers.0.weight": part, "layers.1.weight": part, "layers.1.bias": part}


def cases(n: int = 250, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    noise = lambda: np.exp(rng.normal(0.0, 0.3, n))  # noqa: E731  minibatch noise, about +-35 %
    out = []

    steady = 2.0 * noise()
    out.append(Case("steady", "noisy norm around 2 for the whole run", "ok", _history(steady, _split(steady))))

    decay = 5.0 * np.exp(-np.arange(n) / 80) * noise() + 0.05
    out.append(Case("converging", "norm decays 100x as the loss falls", "ok", _history(decay, _split(decay))))

    one_spike = 2.0 * noise()
    one_spike[150] *= 15
    out.append(Case("one_spike", "one minibatch 15x above the running median (recovers)", "ok",
                    _history(one_spike, _split(one_spike))))

    slow = 1.0 * 1.025 ** np.arange(n) * noise()  # ~480x over the run, never 10x in one step
    out.append(Case("slow_growth", "norm grows 2.5 % a step: ~500x over the run, no single jump", "exploding",
                    _history(slow, _split(slow))))

    climb = np.concatenate([13 * 4.0 ** np.arange(5), np.full(n - 5, 300.0)]) * noise()  # 13 -> 3300 in 4 steps
    u = np.where(np.arange(n) < 8, climb / 3, 1e-4 * noise())  # the recurrent matrix collapses after it
    w = np.where(np.arange(n) < 8, climb / 3, 1e-4 * noise())
    cls = np.sqrt(np.maximum(climb ** 2 - u ** 2 - w ** 2, 0.0))
    out.append(Case("climb_then_collapse", "the unclipped SRN: 250x in 4 steps, then rnn.U and rnn.W collapse "
                    "while the classifier keeps the total up", "exploding,vanishing",
                    _history(climb, {"rnn.U": u, "rnn.W": w, "classifier.weight": cls})))

    spikes = 2.0 * noise()
    spikes[[40, 90, 140, 190]] *= 100
    out.append(Case("isolated_spikes", "four one-step spikes to ~100x the start, back at once (a converged "
                    "classifier's rare hard minibatch): reported as spikes, no explosion", "ok",
                    _history(spikes, _split(spikes))))

    bursts = 2.0 * noise()
    bursts[60:90] *= 60
    bursts[150:170] *= 60
    out.append(Case("bursts", "the norm jumps 60x and stays there for 20-30 steps, twice", "exploding",
                    _history(bursts, _split(bursts))))

    threshold = 20.0
    clipped_total = np.concatenate([13 * 4.0 ** np.arange(5), np.full(n - 5, 300.0)]) * noise()
    coef = np.minimum(1.0, threshold / clipped_total)
    out.append(Case("clipped_spikes", "the same climb under clip norm 20: the clipper bounds every large step",
                    "spikes_clipped", _history(clipped_total, _split(clipped_total), coef)))

    partly = clipped_total.copy()
    partly[100] = 5000.0
    coef_partly = np.minimum(1.0, threshold / partly)
    coef_partly[100] = 1.0  # one huge step went through unclipped (e.g. clipping switched off mid-run)
    out.append(Case("clipped_but_one_escaped", "as clipped_spikes, but one of the large steps was not clipped",
                    "exploding", _history(partly, _split(partly), coef_partly)))

    depth = 2.0 * noise()
    out.append(Case("vanishing_first_layer", "first layer's gradient 1e-9 of the last layer's (deep sigmoid MLP)",
                    "vanishing", _history(depth, {"layers.0.weight": depth * 1e-9, "layers.1.weight": depth * 1e-5,
                                                  "layers.2.weight": depth})))

    dead = np.full(n, 0.3) * noise()
    out.append(Case("zero_gradient_layer", "hidden layers get exactly zero gradient (dead ReLUs, zero init)",
                    "vanishing", _history(dead, {"layers.0.weight": np.zeros(n), "layers.1.weight": np.zeros(n),
                                                 "layers.2.weight": dead})))
    return out
