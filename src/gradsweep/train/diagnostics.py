"""Gradient-health diagnostics: a verdict per run from its recorded telemetry.

:func:`diagnose` is a pure function of the run's history (``name -> (steps, values)``, as kept
by :class:`~gradsweep.train.sinks.HistorySink` or read back from MLflow) plus, for ReLU MLPs, the
model and training inputs. It returns ``health/*`` metrics and the verdict list behind the tag
``grad_health`` (``ok`` or a comma list of ``exploding``, ``spikes_clipped``, ``vanishing``,
``dead_units``, ``nonfinite``). Thresholds are DiagnosticsConfig.

* exploding: the total norm (``grad_norm/total``, before clipping) peaked at ``growth_factor`` x
  its value at the run's first step, whatever path it took (a climb over several steps counts as
  much as one jump), and it stayed up: its running median over ``level_window`` steps reached
  ``level_factor`` x the first step. Judged against the run's own start, so it does not depend on
  the details of a chaotic trajectory; isolated one-step spikes (a converged classifier's rare hard
  minibatch) are counted and reported but are no explosion.
* spikes_clipped: the same evidence, but on every such step the clipper acted (``clip/coef`` < 1):
  the norm before clipping exploded and the update was bounded. The remedy working, not a failure.
* vanishing: (a) some weight's gradient vanished on at least ``vanishing_frac`` of the steps:
  numerically zero, or collapsed below a tiny fraction of its own earlier peak while still tiny
  beside the step's total norm (per parameter: a recurrent matrix can collapse while the
  classifier's gradient keeps the total up). Biases are measured but do not decide: their
  gradient is a sum of signed errors and legitimately cancels once the output fits the class
  balance (seen on plateaued MLPs). Or (b) in a layered model the first layer's
  gradient is a tiny fraction of the last layer's over the first steps.
* dead_units: a ReLU MLP whose hidden units output 0 on every training example.
* nonfinite: a NaN/Inf loss or gradient norm was recorded (on a step that was not skipped).
* skipped_steps: ``trainer.precision=fp16``'s loss scaler skipped steps whose gradients overflowed
  (``amp/skipped``); the other verdicts are judged on the steps it did not skip.
* too_few_steps: fewer than ``min_steps`` steps were recorded (``trainer.log_every_steps`` larger
  than the run): no exploding or vanishing verdict is given on so little evidence.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from gradsweep.checks import positive, require
from gradsweep.train.sinks import Series

LAYER = re.compile(r"^(layers|convs)\.(\d+)\.weight$")
BIAS = re.compile(r"(^|\.)(bias|b)$|\.bias_(ih|hh)_l\d+(_reverse)?$")
TAG = "grad_health"
DEAD_UNIT_ROWS = 8192  # training rows fed to the model for the dead-unit count
log = logging.getLogger("gradsweep")
VERDICTS = ("exploding", "spikes_clipped", "vanishing", "dead_units", "nonfinite", "skipped_steps", "too_few_steps")
STEP_VALUE_PREFIXES = ("train/", "grad_norm/", "clip/", "amp/")  #: the per-step records (not evaluations)


@dataclass
class DiagnosticsConfig:
    """Thresholds of the end-of-run gradient-health verdict (:mod:`gradsweep.train.diagnostics`).

    The verdict is the tag ``grad_health``: ``ok``, or a comma list of ``exploding``,
    ``spikes_clipped``, ``vanishing``, ``dead_units``, ``nonfinite``. Calibrated on labelled
    synthetic histories and on every study variant over 5 seeds (docs/studies.md).
    """

    enabled: bool = True
    #: fewer recorded steps than this give the verdict too_few_steps instead of exploding / vanishing
    #: (the windows below need at least level_window and ratio_steps steps to mean anything)
    min_steps: int = 10
    #: exploding when the peak total norm (before clipping) reaches growth_factor x the first step's
    #: AND the running median over level_window steps reaches level_factor x it. Measured over 5
    #: seeds (docs/studies.md): the unclipped SRN peaks at 48-26000x and holds 20-60x at every length,
    #: seed and thread count; no healthy run of the studies has both: converged circles classifiers
    #: peak at up to 68x in one-step spikes but hold <= 8x, an MLP escaping its saddle holds 16x
    #: at a 16x peak, the CNN peaks at <= 21x holding <= 12x
    growth_factor: float = 25.0
    level_factor: float = 15.0
    level_window: int = 10
    #: a spike is a step whose total gradient norm (before clipping) exceeds spike_factor x the
    #: median total norm of the previous spike_window steps and the norm of the first step;
    #: counted from step spike_min_history, reported (health/spike_count, the console line), no verdict
    spike_factor: float = 10.0
    spike_window: int = 50
    spike_min_history: int = 5
    #: a parameter's gradient has vanished on a step when its norm is below vanish_abs, or below
    #: both vanish_rel_peak x its own peak so far and vanish_rel_total x that step's total norm
    #: (it collapsed while other parameters still get gradient)
    vanish_abs: float = 1e-12
    vanish_rel_peak: float = 1e-4
    vanish_rel_total: float = 1e-3
    vanishing_frac: float = 0.5  # vanishing when some parameter vanished on >= this fraction of steps
    #: layered models (MLP layers.i, CNN convs.i + classifier): median over the first ratio_steps
    #: steps of |grad first-layer weight| / |grad last-layer weight|; vanishing when below the minimum
    ratio_steps: int = 10
    first_last_ratio_min: float = 1e-7
    #: ReLU MLPs: dead_units when >= this fraction of hidden units output 0 on every training example
    dead_frac: float = 0.5

    def __post_init__(self) -> None:
        require(self.spike_factor > 1, "diagnostics.spike_factor", self.spike_factor, "a number > 1")
        require(self.growth_factor > 1, "diagnostics.growth_factor", self.growth_factor, "a number > 1")
        require(self.level_factor > 1, "diagnostics.level_factor", self.level_factor, "a number > 1")
        for k in ("min_steps", "spike_window", "spike_min_history", "level_window", "ratio_steps"):
            require(getattr(self, k) >= 1, f"diagnostics.{k}", getattr(self, k), "an integer >= 1")
        for k in ("vanish_abs", "vanish_rel_peak", "vanish_rel_total", "first_last_ratio_min"):
            positive(f"diagnostics.{k}", getattr(self, k), strict=False)
        for k in ("vanishing_frac", "dead_frac"):
            require(0 < getattr(self, k) <= 1, f"diagnostics.{k}", getattr(self, k), "a number in (0, 1]")


@dataclass
class Diagnosis:
    metrics: dict[str, float] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one clause per verdict, for the console

    @property
    def tag(self) -> str:
        return ",".join(self.verdicts) or "ok"

    def summary(self) -> str:
        """One console line: the peak norm, its step and its ratio to the start, then the verdict and why."""
        m = self.metrics
        head = ""
        if "health/peak_grad_norm" in m:
            head = f"peak grad_norm {m['health/peak_grad_norm']:.4g} at step {int(m['health/peak_step'])}"
            if math.isfinite(m.get("health/growth_ratio", math.nan)):
                head += f" ({m['health/growth_ratio']:.3g}x the first step's {m['health/start_grad_norm']:.3g})"
            head += "; "
        return head + f"grad_health={self.tag}" + (": " + "; ".join(self.notes) if self.notes else "")


def layer_weights(param_names: list[str]) -> list[str]:
    """First-to-last weight parameters of a layered model (MLP ``layers.i``, CNN ``convs.i`` then
    ``classifier``); empty when the model is not layered."""
    found = sorted((int(m.group(2)), n) for n in param_names if (m := LAYER.match(n)))
    names = [n for _, n in found]
    if names and names[0].startswith("convs.") and "classifier.weight" in param_names:
        names.append("classifier.weight")
    return names if len(names) >= 2 else []


def spikes(total: np.ndarray, factor: float, window: int, min_history: int, floor: float = 0.0) -> np.ndarray:
    """Indices of steps whose value exceeds ``factor`` x the median of the previous ``window`` values
    and ``floor``."""
    start = max(min_history, 1)
    if len(total) <= start:
        return np.array([], dtype=int)
    ref = np.empty(len(total) - start)
    for t in range(start, min(window, len(total))):  # the first steps: a shorter window
        ref[t - start] = np.median(total[:t])
    if len(total) > window:  # then every full window at once
        first = max(window, start)
        ref[first - start:] = running_median(total[:-1], window)[first - window:]
    steps = np.arange(start, len(total))
    hit = (ref > 0) & (total[start:] > factor * ref) & (total[start:] > floor)
    return steps[hit].astype(int)


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of each full window of ``window`` consecutive values (empty when there are fewer)."""
    if len(values) < window:
        return np.array([], dtype=float)
    return np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=1)


def vanished_steps(norm: np.ndarray, total: np.ndarray, cfg: DiagnosticsConfig) -> np.ndarray:
    """Boolean per step: this parameter's gradient has vanished (see the module docstring)."""
    peak_so_far = np.maximum.accumulate(norm)
    collapsed = (norm < cfg.vanish_rel_peak * peak_so_far) & (norm < cfg.vanish_rel_total * total)
    return (norm < cfg.vanish_abs) | collapsed


def _without_skipped_steps(history: dict[str, Series], d: Diagnosis) -> dict[str, Series]:
    """The history without the steps an fp16 loss scaler skipped (their gradients overflowed and
    were not applied), and the verdict ``skipped_steps`` naming them."""
    if "amp/skipped" not in history:
        return history
    at, flag = (np.asarray(a) for a in history["amp/skipped"])
    skipped = at[flag > 0]
    if len(skipped) == 0:
        return history
    d.verdicts.append("skipped_steps")
    d.metrics["health/skipped_steps"] = float(len(skipped))
    d.notes.append(f"the fp16 loss scaler skipped {len(skipped)} of {len(at)} steps (inf/NaN gradients), "
                   f"the first at step {int(skipped[0])}")
    out = dict(history)
    for name, (steps, values) in history.items():
        if name.startswith(STEP_VALUE_PREFIXES):
            steps = np.asarray(steps)
            keep = ~np.isin(steps, skipped)
            out[name] = (steps[keep], np.asarray(values)[keep])
    return out


def _aligned(history: dict[str, Series], names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Values of ``names`` on the steps where all of them were recorded and finite."""
    series = [(np.asarray(history[n][0], dtype=np.int64), np.asarray(history[n][1], dtype=float)) for n in names]
    common = series[0][0]
    for steps, _ in series[1:]:
        if len(steps) != len(common) or not np.array_equal(steps, common):
            common = np.intersect1d(common, steps)
    cols = [values if len(steps) == len(common) and np.array_equal(steps, common)
            else values[np.searchsorted(steps, common)] for steps, values in _sorted(series)]
    keep = np.isfinite(np.vstack(cols)).all(axis=0) if cols else np.zeros(0, bool)
    return common[keep], {n: c[keep] for n, c in zip(names, cols, strict=True)}


def _sorted(series: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each (steps, values) in step order, a repeated step's last value kept."""
    out = []
    for steps, values in series:
        if len(steps) > 1 and not (np.diff(steps) > 0).all():
            order = np.argsort(steps, kind="stable")
            steps, values = steps[order], values[order]
            last = np.r_[steps[1:] != steps[:-1], True]
            steps, values = steps[last], values[last]
        out.append((steps, values))
    return out


def _at_steps(history: dict[str, Series], name: str, steps: np.ndarray) -> Optional[np.ndarray]:
    """Values of ``name`` on ``steps`` (NaN where it was not recorded); None when never recorded."""
    if name not in history:
        return None
    [(have, values)] = _sorted([(np.asarray(history[name][0], dtype=np.int64),
                                 np.asarray(history[name][1], dtype=float))])
    pos = np.clip(np.searchsorted(have, steps), 0, max(0, len(have) - 1))
    found = (have[pos] == steps) if len(have) else np.zeros(len(steps), bool)
    return np.where(found, values[pos] if len(have) else math.nan, math.nan)


def dead_relu_fraction(model, x) -> Optional[float]:
    """Fraction of the hidden units of a ReLU MLP that output 0 on every row of ``x``."""
    import torch

    if not hasattr(model, "hidden_activations") or not isinstance(getattr(model, "act", None), torch.nn.ReLU):
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            acts = model.hidden_activations(x)
    finally:
        model.train(was_training)
    dead = sum(int((a <= 0).all(dim=0).sum()) for a in acts)
    units = sum(a.shape[1] for a in acts)
    return dead / units if units else None


def hidden_unit_spread(model) -> Optional[float]:
    """Largest spread (std across units) of the incoming weights and bias of any hidden layer of an
    MLP: 0 means every hidden layer's units are identical (symmetry never broken)."""
    import torch

    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "hidden_activations") or len(layers) < 2:
        return None
    with torch.no_grad():
        spreads = [torch.cat([lay.weight, lay.bias[:, None]], 1).std(dim=0, unbiased=False).max()
                   for lay in layers[:-1] if lay.weight.shape[0] > 1]
    return float(torch.stack(spreads).max()) if spreads else None


def diagnose(history: dict[str, Series], cfg: Optional[DiagnosticsConfig] = None, model=None,
             train_x=None) -> Diagnosis:
    """Health metrics and verdicts of one run (``history`` as recorded by the training loop): one
    judge per verdict family, in the order their notes are read."""
    cfg = cfg or DiagnosticsConfig()
    d = Diagnosis()
    if not _recorded_steps(history):
        return d
    history = _without_skipped_steps(history, d)
    if not _recorded_steps(history):
        return d
    _judge_nonfinite(d, history)
    params = [k.removeprefix("grad_norm/") for k in history
              if k.startswith("grad_norm/") and k not in ("grad_norm/total", "grad_norm/total_clipped")]
    steps, vals = _aligned(history, ["grad_norm/total", *(f"grad_norm/{p}" for p in params)])
    if len(steps) == 0:
        d.verdicts = d.verdicts or ["nonfinite"]
        return d
    total = vals.pop("grad_norm/total")
    if len(steps) < cfg.min_steps:  # the facts, no exploding / vanishing verdict on so little evidence
        _judge_too_few_steps(d, steps, total, cfg)
    else:
        _judge_exploding(d, history, steps, total, cfg)
        _judge_vanishing(d, {name.removeprefix("grad_norm/"): v for name, v in vals.items()}, total, cfg)
    _judge_units(d, model, train_x, cfg)
    d.verdicts = [v for v in VERDICTS if v in d.verdicts]
    return d


def _recorded_steps(history: dict[str, Series]) -> int:
    return len(history.get("grad_norm/total", ([], []))[0])


def _judge_nonfinite(d: Diagnosis, history: dict[str, Series]) -> None:
    """nonfinite: a NaN/Inf total gradient norm or loss was recorded."""
    raw_total = np.array(history["grad_norm/total"][1], dtype=float)
    raw_loss = np.array(history.get("train/loss", ([], []))[1], dtype=float)
    if not np.isfinite(raw_total).all() or not np.isfinite(raw_loss).all():
        d.verdicts.append("nonfinite")
        bad = [s for s, v in zip(*history["grad_norm/total"], strict=True) if not math.isfinite(v)]
        d.notes.append(f"non-finite gradient norm at step {bad[0]}" if bad else "non-finite loss")


def _judge_too_few_steps(d: Diagnosis, steps: np.ndarray, total: np.ndarray, cfg: DiagnosticsConfig) -> None:
    """too_few_steps: the peak is reported, no exploding or vanishing verdict is given."""
    d.metrics.update({"health/peak_grad_norm": float(total.max()),
                      "health/peak_step": float(steps[int(np.argmax(total))])})
    d.verdicts.append("too_few_steps")
    d.notes.append(f"not enough steps for a verdict: {len(steps)} recorded, at least {cfg.min_steps} needed "
                   "(diagnostics.min_steps); record more often with a smaller trainer.log_every_steps")


def _judge_exploding(d: Diagnosis, history: dict[str, Series], steps: np.ndarray, total: np.ndarray,
                     cfg: DiagnosticsConfig) -> None:
    """exploding / spikes_clipped: growth from the run's own start that is held, not one step;
    isolated spikes are counted and noted, no verdict."""
    peak = int(np.argmax(total))
    start = float(total[0])
    sp = spikes(total, cfg.spike_factor, cfg.spike_window, cfg.spike_min_history, floor=start)
    level = running_median(total, cfg.level_window)
    growth = float(total[peak] / start) if start > 0 else math.nan
    held = float(level.max() / start) if start > 0 and len(level) else math.nan
    d.metrics.update({"health/peak_grad_norm": float(total[peak]), "health/peak_step": float(steps[peak]),
                      "health/start_grad_norm": start, "health/growth_ratio": growth, "health/level_ratio": held,
                      "health/spike_count": float(len(sp)), "health/median_grad_norm": float(np.median(total))})
    coef = _at_steps(history, "clip/coef", steps)
    if coef is not None:
        d.metrics["health/clipped_frac"] = float(np.mean(coef < 1.0)) if len(coef) else 0.0
    if growth >= cfg.growth_factor and held >= cfg.level_factor:
        evidence = np.flatnonzero(total >= cfg.growth_factor * start)
        why = (f"norm before clipping reached {total[peak]:.4g} at step {steps[peak]}, {growth:.3g}x its start "
               f"({start:.3g}), and held {held:.3g}x over {cfg.level_window} steps")
        if coef is not None and bool(np.all(coef[evidence] < 1.0)):
            d.verdicts.append("spikes_clipped")
            d.notes.append(f"{why}; the clipper bounded all {len(evidence)} steps above {cfg.growth_factor:g}x")
        else:
            d.verdicts.append("exploding")
            unclipped = len(evidence) if coef is None else int(np.sum(~(coef[evidence] < 1.0)))
            d.notes.append(f"{why}; {unclipped} of the {len(evidence)} steps above {cfg.growth_factor:g}x unclipped")
    elif len(sp):
        d.notes.append(f"{len(sp)} isolated spike(s) > {cfg.spike_factor:g}x the running median, the largest "
                       f"{total[sp].max():.4g} ({total[sp].max() / start:.3g}x the start) at step "
                       f"{steps[sp[np.argmax(total[sp])]]}; the norm did not stay up")


def _judge_vanishing(d: Diagnosis, norms: dict[str, np.ndarray], total: np.ndarray, cfg: DiagnosticsConfig) -> None:
    """vanishing, from the per-parameter norms (``norms``: parameter name -> its norm per step)."""
    why = [w for w in (_vanished_weights(d, norms, total, cfg), _first_last_ratio(d, norms, cfg)) if w]
    if why:
        d.verdicts.append("vanishing")
        d.notes.extend(why)


def _vanished_weights(d: Diagnosis, norms: dict[str, np.ndarray], total: np.ndarray,
                      cfg: DiagnosticsConfig) -> Optional[str]:
    """vanishing (a): some weight's gradient vanished on at least ``vanishing_frac`` of the steps."""
    fracs = {p: float(np.mean(vanished_steps(norm, total, cfg))) for p, norm in norms.items()}
    for p, f in fracs.items():
        d.metrics[f"health/vanishing_frac/{p}"] = f
    if not fracs:
        return None
    d.metrics["health/vanishing_frac_max"] = max(fracs.values())
    weights = {p: f for p, f in fracs.items() if not BIAS.search(p)}
    if not weights or max(weights.values()) < cfg.vanishing_frac:
        return None
    gone = sorted((p for p in weights if weights[p] >= cfg.vanishing_frac), key=lambda p: -weights[p])
    return (f"gradient vanished on {weights[gone[0]]:.0%} of steps for {', '.join(gone[:4])}"
            + (f" (+{len(gone) - 4} more)" if len(gone) > 4 else ""))


def _first_last_ratio(d: Diagnosis, norms: dict[str, np.ndarray], cfg: DiagnosticsConfig) -> Optional[str]:
    """vanishing (b): in a layered model, the first layer's gradient a tiny fraction of the last
    layer's over the first steps."""
    layered = layer_weights(list(norms))
    if not layered:
        return None
    first, last = norms[layered[0]], norms[layered[-1]]
    n = min(cfg.ratio_steps, len(first))
    ok = last[:n] > 0
    if not ok.any():
        return None
    ratio = float(np.median(first[:n][ok] / last[:n][ok]))
    d.metrics["health/first_last_ratio"] = ratio
    if not ratio < cfg.first_last_ratio_min:
        return None
    return f"first-layer gradient is {ratio:.2g}x the last layer's ({layered[0]} / {layered[-1]}, first {n} steps)"


def _judge_units(d: Diagnosis, model, train_x, cfg: DiagnosticsConfig) -> None:
    """dead_units (ReLU MLPs), and the hidden units' spread (MLPs): from the trained model."""
    if model is not None and train_x is not None:
        frac = dead_relu_fraction(model, train_x)
        if frac is not None:
            d.metrics["health/dead_relu_frac"] = frac
            if frac >= cfg.dead_frac:
                d.verdicts.append("dead_units")
                d.notes.append(f"{frac:.0%} of ReLU units never active on the training set")
    if model is not None:
        spread = hidden_unit_spread(model)
        if spread is not None:
            d.metrics["health/hidden_unit_spread"] = spread


def record_health(history: dict[str, Series], cfg: DiagnosticsConfig, model, train_x, sink,
                  set_tags: Callable[[dict[str, str]], None], run_ref: str = "") -> Optional[Diagnosis]:
    """End of a run: diagnose, send the ``health/*`` metrics to ``sink`` (at the last step), set the
    ``grad_health`` tag, and say so on the console when exploding or vanishing. Never raises: a
    failed diagnosis must not cost the run its status."""
    if not cfg.enabled:
        return None
    try:
        x = train_x[:DEAD_UNIT_ROWS] if train_x is not None else None
        d = diagnose(history, cfg, model, x)
        if len(history.get("grad_norm/total", ([], []))[0]) == 0:
            return d
        if d.metrics:
            sink.log_metrics(int(np.max(history["grad_norm/total"][0])), d.metrics)
        set_tags({TAG: d.tag})
        flagged = {"exploding", "vanishing"} & set(d.verdicts)
        (log.warning if flagged else log.info)("run %s %s", run_ref, d.summary())
        return d
    except Exception as e:  # diagnostics never fail the run they report on
        log.error("gradient-health diagnostics failed: %s: %s", type(e).__name__, e)
        return None
