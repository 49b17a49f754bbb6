"""Gradient telemetry: every parameter's gradient L2 norm from one fused kernel per step.

The norms stay on the device; :class:`StepTelemetry` stacks them with the loss, accuracy and
clip figures into one vector so the host receives a whole step in a single transfer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model under ``torch.compile``'s and DDP's wrappers, whose parameter names carry
    ``_orig_mod.`` and ``module.``: the names recorded are the model's own, however it runs.
    ``_orig_mod`` is the attribute torch.compile's wrapper (``OptimizedModule``) keeps the model in:
    torch has no public accessor for it, and its parameter names are made from it."""
    while True:
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else \
            getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class GradientNorms:
    """Per-parameter and total L2 gradient norms of a model, computed with ``torch._foreach_norm``."""

    def __init__(self, model: nn.Module):
        model = unwrapped(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        declared = output_dims(model)
        #: each parameter's output axis (where its units lie, for unit-wise rules such as AGC)
        self.output_dims = [declared.get(n, 0) for n in self.names]

    def grads(self) -> list[torch.Tensor]:
        """Current gradients; a parameter without one (unused this step) contributes zeros."""
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def per_param(self, grads: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(P,) tensor of L2 norms on the device: one fused kernel, no host sync."""
        grads = self.grads() if grads is None else grads
        return torch.stack(torch._foreach_norm(grads, 2.0))

    @staticmethod
    def total(per_param: torch.Tensor) -> torch.Tensor:
        """Global L2 norm from the per-parameter L2 norms (same as clip_grad_norm_'s total)."""
        return torch.linalg.vector_norm(per_param, 2.0)


#: What a module may declare when a weight of its own is not stored (output, input, ...) as torch's
#: layers store theirs: ``{local parameter name: output axis}``. SRNLayer's W (input x output, used as
#: ``x @ W``) declares 1. Read by :func:`output_dims` for the whole model.
OUTPUT_DIMS_ATTR = "agc_output_dims"


def output_dims(model: nn.Module) -> dict[str, int]:
    """Every parameter's declared output axis, by its full name (``rnn.W`` -> 1); undeclared: absent
    (axis 0: torch's nn.Linear, nn.Conv*, nn.Embedding layout)."""
    out: dict[str, int] = {}
    for prefix, module in model.named_modules():
        for local, dim in (getattr(module, OUTPUT_DIMS_ATTR, None) or {}).items():
            out[f"{prefix}.{local}" if prefix else local] = int(dim)
    return out


def metric_names(param_names: list[str], clip_metrics: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Order of the values in a step vector (see :func:`step_vector`). ``clip_metrics``: what the
    clipping rule reports beside its factor (``clip/threshold``, ``clip/clipped_frac``), if anything."""
    return ["train/loss", "train/acc", "grad_norm/total", "grad_norm/total_clipped", "clip/coef",
            *clip_metrics, *(f"grad_norm/{n}" for n in param_names)]


def step_vector(loss: torch.Tensor, acc: torch.Tensor, total: torch.Tensor, total_clipped: torch.Tensor,
                coef: torch.Tensor, per_param: torch.Tensor, clip_extra: torch.Tensor | None = None) -> torch.Tensor:
    """Everything one step reports, in :func:`metric_names` order, as one float tensor."""
    head = torch.stack([loss.detach().float(), acc.float(), total.float(), total_clipped.float(),
                        coef.float().reshape(())])
    parts = [head] if clip_extra is None else [head, clip_extra.float().reshape(-1)]
    return torch.cat([*parts, per_param.float()])


class ParamStats:
    """Mean and (population) standard deviation of each of a fixed list of tensors, on the device.

    All tensors are concatenated once and reduced per tensor with ``index_add_`` (two passes: the
    mean, then squared deviations, so a constant tensor gives std 0 exactly): a handful of kernels
    whatever the number of parameters, and no host sync.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        device = params[0].device if params else torch.device("cpu")
        sizes = torch.tensor([p.numel() for p in params], device=device)
        self.count = sizes.float()
        self.index = torch.repeat_interleave(torch.arange(len(params), device=device), sizes)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """(2, P): row 0 the means, row 1 the standard deviations."""
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        n = len(self.count)
        mean = torch.zeros(n, device=flat.device).index_add_(0, self.index, flat) / self.count
        dev = flat - mean[self.index]
        var = torch.zeros(n, device=flat.device).index_add_(0, self.index, dev * dev) / self.count
        return torch.stack([mean, var.sqrt()])


def epoch_stat_names(param_names: list[str]) -> list[str]:
    """Order of the values of :meth:`ParamStats` for weights then gradients, flattened."""
    return [f"{kind}_{stat}/{n}" for kind in ("weight", "grad") for stat in ("mean", "std") for n in param_names]
