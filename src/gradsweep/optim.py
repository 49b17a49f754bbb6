"""Optimizer factory."""
from __future__ import annotations

import torch

from gradsweep.config import AdamConfig, OptimizerConfig, RMSpropConfig, SGDConfig


def build_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if isinstance(cfg, AdamConfig):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if isinstance(cfg, RMSpropConfig):
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
    raise TypeError(f"no optimizer for {type(cfg).__name__}")
