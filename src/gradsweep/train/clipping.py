"""Clipping strategies. Each returns the factor applied and the L2 norm after clipping.

Norm clipping uses torch's own ``get_total_norm`` / ``clip_grads_with_norm_`` (the two halves of
``clip_grad_norm_``) so the L2 total the telemetry already computed is reused, not recomputed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from gradsweep.checks import choice, require
from gradsweep.train.registry import register
from gradsweep.train.telemetry import GradientNorms

NORM_TYPES = (1.0, 2.0, math.inf)


@dataclass
class ClipConfig:
    """none: log only; norm: rescale so the global norm <= max_norm; value: clamp each element."""

    name: str = "none"
    max_norm: Optional[float] = None
    norm_type: float = 2.0  # 1|2|inf: norm used to decide the clip (telemetry is always L2)
    clip_value: Optional[float] = None

    def __post_init__(self) -> None:
        choice("clip.name", self.name, ("none", "norm", "value"))
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
    def __call__(self, norms: GradientNorms, grads: list[torch.Tensor], total_l2: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip ``grads`` in place; return (coef, L2 norm after clipping) as device tensors."""
        raise NotImplementedError


class NoClip(Clipper):
    """Log-only: gradients untouched."""

    def __call__(self, norms, grads, total_l2):
        return torch.ones((), device=total_l2.device), total_l2


class NormClip(Clipper):
    """Rescale all gradients so their global ``norm_type`` norm is at most ``max_norm``."""

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)

    def __call__(self, norms, grads, total_l2):
        total = total_l2 if self.norm_type == 2.0 else torch.nn.utils.get_total_norm(grads, self.norm_type)
        torch.nn.utils.clip_grads_with_norm_(norms.params, self.max_norm, total)
        coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)  # what clip_grads_with_norm_ applied
        return coef, total_l2 * coef


class ValueClip(Clipper):
    """Clamp every gradient element to [-clip_value, clip_value]."""

    def __init__(self, clip_value: float):
        self.clip_value = float(clip_value)

    def __call__(self, norms, grads, total_l2):
        torch.nn.utils.clip_grad_value_(norms.params, self.clip_value)
        after = norms.total(norms.per_param())
        coef = torch.where(total_l2 > 0, after / total_l2.clamp_min(1e-30), torch.ones_like(total_l2))
        return coef, after


@register("clip", "none", ClipConfig)
def _none(cfg: ClipConfig) -> Clipper:
    return NoClip()


@register("clip", "norm", NormClipConfig)
def _norm(cfg: ClipConfig) -> Clipper:
    return NormClip(cfg.max_norm, cfg.norm_type)


@register("clip", "value", ValueClipConfig)
def _value(cfg: ClipConfig) -> Clipper:
    return ValueClip(cfg.clip_value)
