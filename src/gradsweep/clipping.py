"""Clipping strategies. Each returns the factor applied and the L2 norm after clipping.

Norm clipping uses torch's own ``get_total_norm`` / ``clip_grads_with_norm_`` (the two halves of
``clip_grad_norm_``) so the L2 total the telemetry already computed is reused, not recomputed.
"""
from __future__ import annotations

import math

import torch

from gradsweep.config import ClipConfig
from gradsweep.telemetry import GradientNorms


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


def build_clipper(cfg: ClipConfig) -> Clipper:
    if cfg.name == "norm":
        return NormClip(cfg.max_norm, cfg.norm_type if not math.isinf(cfg.norm_type) else math.inf)
    if cfg.name == "value":
        return ValueClip(cfg.clip_value)
    return NoClip()
