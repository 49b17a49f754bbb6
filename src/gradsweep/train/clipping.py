"""Clipping strategies. Each returns the factor applied and the L2 norm after clipping.

Norm clipping uses torch's own ``get_total_norm`` / ``clip_grads_with_norm_`` (the two halves of
``clip_grad_norm_``) so the L2 total the telemetry already computed is reused, not recomputed.

Adaptive rules: the threshold follows the run's own gradient history instead of a hand-picked
number. Each rule is written from its paper:

* ``autoclip`` - Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
  Networks": clip the global norm to the p-th percentile of every global norm seen so far (this step's
  included).
* ``agc`` - Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without Normalization"
  (NFNets): unit-wise; a unit's gradient G_i is rescaled to lambda * max(||W_i||, eps) whenever
  ||G_i|| / max(||W_i||, eps) > lambda.
* ``zclip`` - Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training": EMA mean and
  variance of the global norm; a norm whose z-score z exceeds z_thres is clipped to
  mean + (z_thres^2 / z) * std (the paper's reciprocal clipping), and the statistics are updated with the
  clipped norm.
* ``adagc`` - Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model
  Pretraining": per tensor, an EMA gamma of its past clipped norms; each tensor is clipped to
  lambda_rel * gamma; during the warm-up the global norm is clipped to lambda_abs and gamma is the
  smallest clipped norm seen.

Everything stays on the device: the per-step decisions are tensors (``torch.where``, ``_foreach`` ops),
the step counters are host integers known without looking at any value, so a step costs no host sync.
What a rule decided (its threshold, the fraction of units or tensors it rescaled) comes back through
:meth:`Clipper.extra` in the step's single transfer. Each rule's state (history, moving averages, step
counter) round-trips through :meth:`Clipper.state_dict` into the trainer's checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from gradsweep.checks import choice, require
from gradsweep.names import CLIP_CLIPPED_FRAC, CLIP_THRESHOLD
from gradsweep.train.registry import register
from gradsweep.train.telemetry import GradientNorms

NORM_TYPES = (1.0, 2.0, math.inf)
#: every ``clip=`` option
CLIP_NAMES = ("none", "norm", "value", "autoclip", "agc", "zclip", "adagc")


@dataclass
class ClipConfig:
    """none: log only; norm: rescale so the global norm <= max_norm; value: clamp each element.

    The adaptive rules' schemas extend this one, so a preset may set ``clip.max_norm`` once and
    sweep ``clip`` over every option (the rules that do not use a key ignore it, as ``none`` does)."""

    name: str = "none"
    max_norm: Optional[float] = None
    norm_type: float = 2.0  # 1|2|inf: norm used to decide the clip (telemetry is always L2)
    clip_value: Optional[float] = None

    def __post_init__(self) -> None:
        choice("clip.name", self.name, CLIP_NAMES)
        # a value given is checked even where this mode ignores it: a typo must not pass silently
        if self.name == "norm" or self.max_norm is not None:
            require(self.max_norm is not None and self.max_norm > 0 and math.isfinite(self.max_norm),
                    "clip.max_norm", self.max_norm, "a finite number > 0")
        choice("clip.norm_type", self.norm_type, NORM_TYPES)
        if self.name == "value" or self.clip_value is not None:
            require(self.clip_value is not None and self.clip_value > 0 and math.isfinite(self.clip_value),
                    "clip.clip_value", self.clip_value, "a finite number > 0")


@dataclass
class NormClipConfig(ClipConfig):
    name: str = "norm"
    max_norm: Optional[float] = 20.0  # the original study's threshold


@dataclass
class ValueClipConfig(ClipConfig):
    name: str = "value"
    clip_value: Optional[float] = 1.0


class Clipper:
    """A clipping rule. Per step the loop calls it once with the gradients and their norms (all on the
    device); it must not move anything to the host (no ``.item()``): what it reports travels in the
    step's single transfer."""

    #: names of the extra per-step metrics the rule reports (``clip/threshold``, ``clip/clipped_frac``),
    #: in the order of :meth:`extra`'s values; empty for the stateless rules
    metrics: tuple[str, ...] = ()

    def __call__(self, norms: GradientNorms, grads: list[torch.Tensor], total_l2: torch.Tensor,
                 per_param: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``grads`` in place; return (coef, L2 norm after clipping) as device tensors.

        ``per_param``: the (P,) L2 norms of ``grads`` before clipping, when the caller has them."""
        raise NotImplementedError

    def extra(self) -> Optional[torch.Tensor]:
        """The last call's values of :attr:`metrics` as one device tensor; NaN where a value means
        nothing at that step (the loop does not log it)."""
        return None

    def extra_values(self) -> torch.Tensor:
        """:meth:`extra` flat, float32, for a rule that has :attr:`metrics` (an error when it reported none)."""
        extra = self.extra()
        if extra is None:
            raise RuntimeError(f"{type(self).__name__} has metrics {self.metrics} but reported no values")
        return extra.float().reshape(-1)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (histories, moving averages, step counters): plain values and tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output."""


class NoClip(Clipper):
    """Log-only: gradients untouched."""

    def __call__(self, norms, grads, total_l2, per_param=None):
        return torch.ones((), device=total_l2.device), total_l2


class NormClip(Clipper):
    """Rescale all gradients so their global ``norm_type`` norm is at most ``max_norm``."""

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def __call__(self, norms, grads, total_l2, per_param=None):
        total = total_l2 if self.norm_type == 2.0 else torch.nn.utils.get_total_norm(grads, self.norm_type)
        torch.nn.utils.clip_grads_with_norm_(norms.params, self.max_norm, total)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)  # what clip_grads_with_norm_ applied
        return coef, total_l2 * coef


class ValueClip(Clipper):
    """Clamp every gradient element to [-clip_value, clip_value]."""

    def __init__(self, clip_value: float):
        self.clip_value = float(clip_value)

    def __call__(self, norms, grads, total_l2, per_param=None):
        torch.nn.utils.clip_grad_value_(norms.params, self.clip_value)
        after = norms.total(norms.per_param())
        coef = torch.where(total_l2 > 0, after / total_l2.clamp_min(1e-30), torch.ones_like(total_l2))
        return coef, after


@register("clip", "none", ClipConfig)
def _none(cfg: ClipConfig) -> Clipper:
    return NoClip()


@register("clip", "norm", NormClipConfig)
def _norm(cfg: ClipConfig) -> Clipper:
    assert cfg.max_norm is not None  # validated by NormClipConfig
    return NormClip(cfg.max_norm, cfg.norm_type)


@register("clip", "value", ValueClipConfig)
def _value(cfg: ClipConfig) -> Clipper:
    assert cfg.clip_value is not None  # validated by ValueClipConfig
    return ValueClip(cfg.clip_value)


# ============================================================================
# The adaptive rules (see the module docstring): schemas, rules, builders.
EPS_DIV = 1e-6  #: added to a norm that divides a threshold, as torch's clip_grad_norm_ does


# ---------------------------------------------------------------------------------- schemas
def _finite_positive(key: str, value: float) -> None:
    require(value is not None and math.isfinite(value) and value > 0, key, value, "a finite number > 0")


@dataclass
class AutoClipConfig(ClipConfig):
    """autoclip: clip the global L2 norm to the ``percentile``-th percentile of the norms seen so far."""

    name: str = "autoclip"
    percentile: float = 10.0  # p in (0, 100]; the paper's default is 10
    #: how many of the latest norms the percentile is taken over (0 = all of them, as in the paper;
    #: each costs 4 bytes on the device and the percentile is a linear-time selection over them)
    history: int = 10000

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.percentile is not None and 0 < self.percentile <= 100, "clip.percentile", self.percentile,
                "a number in (0, 100]")
        require(self.history >= 0, "clip.history", self.history, "an integer >= 0 (0 = every step's norm)")


@dataclass
class AGCConfig(ClipConfig):
    """agc: unit-wise clipping relative to the weights (a unit: one row of a weight, i.e. one output
    unit of nn.Linear / one filter of nn.Conv; a vector is one unit)."""

    name: str = "agc"
    clip_factor: float = 0.01  # lambda: the largest allowed ||G_i|| / max(||W_i||, eps)
    eps: float = 1e-3  # floor of a unit's weight norm (zero-initialised weights still move)
    #: leave the last layer (the classifier: the parameters of the module that owns the model's last
    #: parameter) unclipped, as the paper does
    skip_last_layer: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _finite_positive("clip.clip_factor", self.clip_factor)
        _finite_positive("clip.eps", self.eps)


@dataclass
class ZClipConfig(ClipConfig):
    """zclip: z-score spike detection on the global norm against its EMA mean and variance."""

    name: str = "zclip"
    alpha: float = 0.97  # EMA smoothing of the mean and variance, in (0, 1)
    z_threshold: float = 2.5  # a norm whose z-score exceeds this is a spike
    warmup_steps: int = 25  # norms collected (unclipped) before the statistics start
    eps: float = 1e-6  # added to the standard deviation in the z-score

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.alpha is not None and 0 < self.alpha < 1, "clip.alpha", self.alpha, "a number in (0, 1)")
        _finite_positive("clip.z_threshold", self.z_threshold)
        require(self.warmup_steps >= 1, "clip.warmup_steps", self.warmup_steps, "an integer >= 1")
        _finite_positive("clip.eps", self.eps)


@dataclass
class AdaGCConfig(ClipConfig):
    """adagc: per-tensor clipping to lambda_rel times an EMA of the tensor's past clipped norms."""

    name: str = "adagc"
    beta: float = 0.98  # EMA smoothing of each tensor's clipped norm, in [0, 1)
    lambda_rel: float = 1.05  # a tensor is clipped to lambda_rel x its EMA
    lambda_abs: float = 1.0  # global norm threshold during the warm-up (the paper's 1.0)
    warmup_steps: int = 100  # steps of global clipping before the per-tensor rule

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta is not None and 0 <= self.beta < 1, "clip.beta", self.beta, "a number in [0, 1)")
        _finite_positive("clip.lambda_rel", self.lambda_rel)
        _finite_positive("clip.lambda_abs", self.lambda_abs)
        require(self.warmup_steps >= 0, "clip.warmup_steps", self.warmup_steps, "an integer >= 0")


# ------------------------------------------------------------------------------ helpers
def _scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient by the same device scalar: one fused kernel, no host sync."""
    torch._foreach_mul_(grads, coef)


def _down_to(threshold: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The factor that brings a global norm above ``threshold`` down to it (as clip_grad_norm_), and
    exactly 1 for a norm at or below it (a norm equal to its own percentile is not clipped)."""
    return torch.where(total > threshold, threshold / (total + EPS_DIV), torch.ones_like(total))


def _nan(device: torch.device) -> torch.Tensor:
    return torch.full((), math.nan, device=device)


def _to(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return t if t is None or t.device == device else t.to(device)


class _Stateful(Clipper):
    """A rule with a step counter and a per-step report; ``rule`` names it in the checkpoint."""

    rule = ""

    def __init__(self) -> None:
        self.t = 0  # steps this rule has seen
        self._extra: Optional[torch.Tensor] = None

    def extra(self) -> Optional[torch.Tensor]:
        return self._extra

    def _report(self, *values: torch.Tensor) -> None:
        self._extra = torch.stack([v.float().reshape(()) for v in values])

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.rule:
            raise ValueError(f"clipper state of {state.get('rule')!r} cannot resume clip={self.rule}")
        self.t = int(state["t"])


# ----------------------------------------------------------------------------- autoclip
class AutoClip(_Stateful):
    """Global norm clipped to the ``percentile``-th percentile of the history of global norms.

    The history is a ring buffer on the device (``history`` entries; 0 = unbounded, grown by doubling).
    The percentile interpolates linearly between order statistics, as ``numpy.percentile``; both order
    statistics come from ``torch.kthvalue`` (linear time) at positions the host knows from the step count.
    """

    rule = "autoclip"
    metrics = (CLIP_THRESHOLD,)

    def __init__(self, percentile: float = 10.0, history: int = 10000):
        super().__init__()
        self.q = float(percentile) / 100.0
        self.capacity = int(history)
        self.buf: Optional[torch.Tensor] = None

    def _push(self, total: torch.Tensor) -> None:
        buf = self.buf if self.buf is not None else torch.empty(self.capacity or 256, device=total.device,
                                                                dtype=torch.float32)
        # restored from a checkpoint on another device
        buf = buf if buf.device == total.device else buf.to(total.device)
        if not self.capacity and self.t == len(buf):
            buf = torch.cat([buf, torch.empty_like(buf)])
        buf[self.t % len(buf)] = total.detach().float()
        self.buf = buf
        self.t += 1

    def window(self) -> torch.Tensor:
        """The norms the percentile is taken over (ring order, not chronological)."""
        assert self.buf is not None
        return self.buf[:min(self.t, len(self.buf))]

    def threshold(self) -> torch.Tensor:
        w = self.window()
        pos = self.q * (len(w) - 1)
        lo = math.floor(pos)
        frac = pos - lo
        v_lo = torch.kthvalue(w, lo + 1).values
        if frac <= 0 or lo + 1 >= len(w):
            return v_lo
        v_hi = torch.kthvalue(w, lo + 2).values
        return v_lo + (v_hi - v_lo) * frac

    def __call__(self, norms, grads, total_l2, per_param=None):
        self._push(total_l2)
        thr = self.threshold().to(total_l2.dtype)
        coef = _down_to(thr, total_l2)
        _scale_(grads, coef)
        self._report(thr)
        return coef, total_l2 * coef

    def state_dict(self):
        out = super().state_dict()
        if self.buf is not None:  # chronological, oldest first
            n = min(self.t, len(self.buf))
            start = self.t % len(self.buf) if self.t > len(self.buf) else 0
            out["norms"] = torch.roll(self.buf[:n], -start).detach().cpu().clone()
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        norms = state.get("norms")
        self.buf = None
        if norms is None or not len(norms):
            return
        keep = norms[-self.capacity:] if self.capacity else norms
        size = self.capacity or max(256, 1 << (len(keep) - 1).bit_length())
        self.buf = torch.empty(size, dtype=torch.float32, device=norms.device)
        # lay the kept norms out where the uninterrupted ring buffer holds them
        idx = torch.arange(self.t - len(keep), self.t) % size
        self.buf[idx] = keep.float()


# ---------------------------------------------------------------------------------- agc
class AGC(_Stateful):
    """Unit-wise clipping relative to the weights' norms (NFNets' adaptive gradient clipping).

    A unit is an output unit, as the paper defines it: a slice along the weight's output axis, dim 0
    in torch's (out, in, ...) layout (an output row of nn.Linear, a filter of nn.Conv, a row of
    nn.Embedding) unless the module declares another (``agc_output_dims``, see
    :func:`gradsweep.train.telemetry.output_dims`: the SRN's W and U are (input, output), their units
    are columns); a 0-/1-dimensional tensor is one unit. Stateless between steps (``t`` only counts them).
    """

    rule = "agc"
    metrics = (CLIP_CLIPPED_FRAC,)
    units_name = "units"  # what clip/clipped_frac counts (the console line says it)

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, skip_last_layer: bool = True):
        super().__init__()
        self.clip_factor, self.eps, self.skip_last_layer = float(clip_factor), float(eps), bool(skip_last_layer)
        self.index: Optional[list[int]] = None  # the parameters the rule clips
        self.index_t: Optional[torch.Tensor] = None  # the same, on the device
        self.units = 0

    def setup(self, norms: GradientNorms, device: torch.device) -> None:
        skip = last_layer(norms.names) if self.skip_last_layer else set()
        self.index = [i for i, n in enumerate(norms.names) if n not in skip]
        self.index_t = torch.tensor(self.index, dtype=torch.long, device=device)
        self.axes = [norms.output_dims[i] for i in self.index]
        self.units = sum(_units(norms.params[i], a) for i, a in zip(self.index, self.axes, strict=True))

    def __call__(self, norms, grads, total_l2, per_param=None):
        if self.index is None:
            self.setup(norms, total_l2.device)
        if per_param is None:
            per_param = torch.stack(torch._foreach_norm(grads, 2.0))
        after_sq = per_param.detach().float() ** 2
        clipped, after_parts = [], []
        for i, axis in zip(self.index, self.axes, strict=True):
            g, w = grads[i], norms.params[i].detach()
            dims = tuple(d for d in range(g.dim()) if d != axis) if g.dim() > 1 else None
            g_norm = torch.linalg.vector_norm(g, 2.0, dim=dims, keepdim=dims is not None)
            w_norm = torch.linalg.vector_norm(w, 2.0, dim=dims, keepdim=dims is not None)
            max_norm = w_norm.clamp_min(self.eps) * self.clip_factor
            over = g_norm > max_norm
            scale = torch.where(over, max_norm / g_norm.clamp_min(EPS_DIV), torch.ones_like(g_norm))
            g.mul_(scale)
            clipped.append(over.sum())
            after_parts.append(((g_norm * scale).float() ** 2).sum())
        if self.index:
            after_sq = after_sq.index_put((self.index_t,), torch.stack(after_parts))
            frac = torch.stack(clipped).sum().float() / self.units
        else:
            frac = torch.zeros((), device=total_l2.device)
        after = after_sq.sum().sqrt().to(total_l2.dtype)
        self.t += 1
        self._report(frac)
        return _ratio(after, total_l2), after


def last_layer(names: list[str]) -> set[str]:
    """The parameters of the module that owns the model's last parameter (``classifier.weight``,
    ``classifier.bias``; ``layers.3.weight``, ``layers.3.bias``)."""
    if not names:
        return set()
    owner = names[-1].rpartition(".")[0]
    return {n for n in names if n.rpartition(".")[0] == owner}


def _units(p: torch.Tensor, axis: int = 0) -> int:
    return int(p.shape[axis]) if p.dim() > 1 else 1


def _ratio(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """The effective global factor ||G after|| / ||G before|| (1 for a zero gradient)."""
    return torch.where(before > 0, after / before.clamp_min(1e-30), torch.ones_like(before))


# -------------------------------------------------------------------------------- zclip
class ZClip(_Stateful):
    """Spikes of the global norm, judged by their z-score against EMA statistics, clipped reciprocally.

    Warm-up: the first ``warmup_steps`` norms are collected unclipped; at the last of them the mean and
    the (population) variance of the collected norms start the EMAs. After it, with mean m and standard
    deviation s: z = (g - m) / (s + eps); if z > z_thres the gradients are scaled to the norm
    g* = m + (z_thres^2 / z) s (below m + z_thres s, the further the spike the lower); then
    m <- alpha m + (1 - alpha) g*,  v <- alpha v + (1 - alpha) (g* - m)^2  with the new m, g* = g when
    nothing was clipped. ``clip/threshold`` is the norm above which a step counts as a spike,
    m + z_thres (s + eps); NaN (not logged) during the warm-up.
    """

    rule = "zclip"
    metrics = (CLIP_THRESHOLD,)

    def __init__(self, alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25, eps: float = 1e-6):
        super().__init__()
        self.alpha, self.z, self.warmup, self.eps = float(alpha), float(z_threshold), int(warmup_steps), float(eps)
        self.warm: Optional[torch.Tensor] = None  # the warm-up's norms
        self.mean: Optional[torch.Tensor] = None
        self.var: Optional[torch.Tensor] = None

    def __call__(self, norms, grads, total_l2, per_param=None):
        device = total_l2.device
        g = total_l2.detach().float()
        if self.t < self.warmup:
            if self.warm is None:
                self.warm = torch.zeros(self.warmup, device=device)
            self.warm[self.t] = g
            if self.t == self.warmup - 1:
                self.mean, self.var = self.warm.mean(), self.warm.var(correction=0)
            self.t += 1
            self._report(_nan(device))
            return torch.ones((), device=device, dtype=total_l2.dtype), total_l2
        self.mean, self.var = _to(self.mean, device), _to(self.var, device)
        std = self.var.sqrt()
        z = (g - self.mean) / (std + self.eps)
        spike = z > self.z
        target = self.mean + (self.z * self.z / torch.where(spike, z, torch.ones_like(z))) * std
        coef = torch.where(spike, torch.clamp(target / (g + EPS_DIV), max=1.0), torch.ones_like(g))
        _scale_(grads, coef.to(total_l2.dtype))
        self._report(self.mean + self.z * (std + self.eps))  # the spike threshold this step was judged by
        effective = torch.where(spike, target, g)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        self.t += 1
        coef = coef.to(total_l2.dtype)
        return coef, total_l2 * coef

    def state_dict(self):
        out = super().state_dict()
        if self.t < self.warmup and self.warm is not None:
            out["warm"] = self.warm[:self.t].detach().cpu().clone()
        if self.mean is not None:
            out["mean"], out["var"] = self.mean.detach().cpu().clone(), self.var.detach().cpu().clone()
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.warm, self.mean, self.var = None, state.get("mean"), state.get("var")
        warm = state.get("warm")
        if warm is not None and self.t < self.warmup:
            self.warm = torch.zeros(self.warmup, dtype=torch.float32, device=warm.device)
            self.warm[:len(warm)] = warm


# -------------------------------------------------------------------------------- adagc
class AdaGC(_Stateful):
    """Per-tensor clipping to ``lambda_rel`` times an EMA (``beta``) of each tensor's clipped norms.

    Warm-up (the first ``warmup_steps`` steps): the global norm is clipped to ``lambda_abs`` and each
    tensor's gamma is the smallest clipped norm it has had. After: tensor i is scaled by
    h_i = min(1, lambda_rel gamma_i / ||g_i||) and gamma_i <- beta gamma_i + (1 - beta) h_i ||g_i||.
    One deviation, for tensors whose gradient is exactly zero (the SRN's recurrent matrix at step 0 of
    a zero-initialised run): a zero norm is not an observation, so gamma starts at the first non-zero
    clipped norm, and a tensor that has none yet is not clipped (the paper's min over the warm-up
    would pin such a tensor at zero for the rest of training).
    ``clip/threshold`` is lambda_abs during the warm-up and not logged after it (no global threshold);
    ``clip/clipped_frac`` is the fraction of tensors rescaled.
    """

    rule = "adagc"
    metrics = (CLIP_THRESHOLD, CLIP_CLIPPED_FRAC)
    units_name = "tensors"

    def __init__(self, beta: float = 0.98, lambda_rel: float = 1.05, lambda_abs: float = 1.0,
                 warmup_steps: int = 100):
        super().__init__()
        self.beta, self.lambda_rel, self.lambda_abs = float(beta), float(lambda_rel), float(lambda_abs)
        self.warmup = int(warmup_steps)
        self.gamma: Optional[torch.Tensor] = None  # (P,) per tensor; inf = no observation yet

    def __call__(self, norms, grads, total_l2, per_param=None):
        if per_param is None:
            per_param = torch.stack(torch._foreach_norm(grads, 2.0))
        pp = per_param.detach().float()
        device = pp.device
        if self.gamma is None:
            self.gamma = torch.full_like(pp, math.inf)
        self.gamma = _to(self.gamma, device)
        if self.t < self.warmup:
            coef = _down_to(torch.full_like(total_l2, self.lambda_abs), total_l2)
            _scale_(grads, coef)
            clipped = pp * coef.float()
            self.gamma = torch.where(clipped > 0, torch.minimum(self.gamma, clipped), self.gamma)
            self.t += 1
            self._report(torch.full((), self.lambda_abs, device=device), (coef < 1).float())
            return coef, total_l2 * coef
        fresh = torch.isinf(self.gamma)
        h = torch.where(fresh, torch.ones_like(pp),
                        torch.clamp(self.lambda_rel * self.gamma / pp.clamp_min(1e-30), max=1.0))
        torch._foreach_mul_(grads, list(h.to(grads[0].dtype).unbind()) if grads else [])
        clipped = pp * h
        self.gamma = torch.where(fresh, torch.where(clipped > 0, clipped, self.gamma),
                                 self.beta * self.gamma + (1 - self.beta) * clipped)
        after = torch.linalg.vector_norm(clipped).to(total_l2.dtype)
        self.t += 1
        self._report(_nan(device), (h < 1).float().mean())
        return _ratio(after, total_l2), after

    def state_dict(self):
        out = super().state_dict()
        if self.gamma is not None:
            out["gamma"] = self.gamma.detach().cpu().clone()
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.gamma = state.get("gamma")


# ------------------------------------------------------------------------------ builders
@register("clip", "autoclip", AutoClipConfig)
def _autoclip(cfg: AutoClipConfig) -> Clipper:
    return AutoClip(cfg.percentile, cfg.history)


@register("clip", "agc", AGCConfig)
def _agc(cfg: AGCConfig) -> Clipper:
    return AGC(cfg.clip_factor, cfg.eps, cfg.skip_last_layer)


@register("clip", "zclip", ZClipConfig)
def _zclip(cfg: ZClipConfig) -> Clipper:
    return ZClip(cfg.alpha, cfg.z_threshold, cfg.warmup_steps, cfg.eps)


@register("clip", "adagc", AdaGCConfig)
def _adagc(cfg: AdaGCConfig) -> Clipper:
    return AdaGC(cfg.beta, cfg.lambda_rel, cfg.lambda_abs, cfg.warmup_steps)
