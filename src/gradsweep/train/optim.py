"""Optimizers and their schemas."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gradsweep.checks import choice, positive, require
from gradsweep.train.registry import register


@dataclass
class OptimizerConfig:
    name: str = "???"  # chosen by the config group
    lr: float = 0.1
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        positive("optimizer.lr", self.lr)
        positive("optimizer.weight_decay", self.weight_decay, strict=False)


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "a number in [0, 1)")


@dataclass
class AdamConfig(OptimizerConfig):
    """Adam or AdamW (name selects)."""

    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("optimizer.name", self.name, ("adam", "adamw"))
        for k in ("beta1", "beta2"):
            require(0 <= getattr(self, k) < 1, f"optimizer.{k}", getattr(self, k), "a number in [0, 1)")
        positive("optimizer.eps", self.eps)


@dataclass
class AdamWConfig(AdamConfig):
    name: str = "adamw"
    weight_decay: float = 0.01  # torch's AdamW default (decoupled decay)


@dataclass
class RMSpropConfig(OptimizerConfig):
    name: str = "rmsprop"
    lr: float = 1e-3
    alpha: float = 0.9  # smoothing constant; Keras default 0.9, torch default 0.99
    eps: float = 1e-7  # Keras default
    momentum: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.alpha < 1, "optimizer.alpha", self.alpha, "a number in (0, 1)")
        positive("optimizer.eps", self.eps)


@register("optimizer", "sgd", SGDConfig)
def _sgd(cfg: SGDConfig, params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


@register("optimizer", "adam", AdamConfig)
@register("optimizer", "adamw", AdamWConfig)
def _adam(cfg: AdamConfig, params) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


@register("optimizer", "rmsprop", RMSpropConfig)
def _rmsprop(cfg: RMSpropConfig, params) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
