"""Step vectors reach the host in blocks: the loop keeps each step's vector on the device and moves
a block of them in one transfer (``trainer.sync_every_steps``, and at every evaluation, checkpoint
and the run's end), so on a GPU the CPU can queue the next steps' kernels instead of waiting for
each step to finish.

:func:`to_host` is the one place a block crosses to the host (tests count its calls).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


@contextmanager
def host_sync_allowed(device: torch.device) -> Iterator[None]:
    """A sync the loop means to make (a block's transfer, an evaluation's result): exempt from
    ``torch.cuda.set_sync_debug_mode("error")``, so that mode finds only syncs nobody meant."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def to_host(block: torch.Tensor) -> np.ndarray:
    """A copy on the host (on the CPU too: the block's buffer is reused for the next steps)."""
    with host_sync_allowed(block.device):
        return block.detach().to("cpu", copy=True).numpy()


class StepBlock:
    """Up to ``size`` step vectors of ``width`` float32 values, in one buffer on the device."""

    def __init__(self, size: int, width: int, device: torch.device):
        self.values = torch.empty((size, width), dtype=torch.float32, device=device)
        self.steps = np.empty(size, np.int64)
        self.n = 0

    def add(self, step: int, vector: torch.Tensor) -> None:
        self.values[self.n].copy_(vector)  # device to device: no sync
        self.steps[self.n] = step
        self.n += 1

    @property
    def full(self) -> bool:
        return self.n == len(self.steps)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps (k,), values (k, width)) of the steps added since the last take: one transfer."""
        steps, values = self.steps[:self.n].copy(), to_host(self.values[:self.n])
        self.n = 0
        return steps, values


def first_nonfinite(values: np.ndarray, columns: tuple[int, ...], allowed: np.ndarray | None = None) -> int | None:
    """Index of the first row whose value in any of ``columns`` is NaN/Inf (rows where ``allowed``
    is true excepted: an fp16 step the loss scaler skipped), or None."""
    bad = ~np.isfinite(values[:, list(columns)]).all(axis=1)
    if allowed is not None:
        bad &= ~allowed
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None
