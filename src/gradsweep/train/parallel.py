"""Data parallelism inside the loop: one rank's share of the global batch, the global batch's loss,
and gradients equal to those one process would compute on the whole batch.

``DistributedDataParallel`` averages the gradients over ranks. Each rank therefore back-propagates
its share's loss *sum* times the world size (``reduction=sum``: the average of N such gradients is
the sum over the global batch), or that sum times N over the global count (``reduction=mean``:
the global mean, also when the shares are unequal). The norms the loop then takes are those of
the all-reduced gradients, identical on every rank. The process group is set up by the caller
(:mod:`gradsweep.run.parallel`); this module only uses it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


class DataParallel:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.module: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as DDP: its parameters broadcast from rank 0, its gradients all-reduced in backward."""
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        self.module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return self.module

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the global batch's example indices."""
        return idx.tensor_split(self.world)[self.rank]

    def global_loss(self, logits: torch.Tensor, y: torch.Tensor, loss: str, reduction: str,
                    batch_loss: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global loss as one process reports it, correct, counted, the local loss to back-propagate).
        One all-reduce of three numbers per step (gloo/NCCL, on the device)."""
        local_sum, correct, counted = batch_loss(logits, y, loss, "sum")
        n = counted.float() if loss == "lm" else torch.tensor(float(y.numel() if loss == "mse" else len(y)),
                                                              device=local_sum.device)
        sums = torch.stack([local_sum.detach().float(), correct.float(), counted.float(), n])
        dist.all_reduce(sums)
        total_loss, total_correct, total_counted, total_n = sums.unbind()
        if reduction == "mean":
            return total_loss / total_n.clamp_min(1), total_correct, total_counted, \
                local_sum * self.world / total_n.clamp_min(1)
        return total_loss, total_correct, total_counted, local_sum * self.world


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
