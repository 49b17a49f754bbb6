"""Mixed precision: ``trainer.precision=32|bf16|fp16``.

bf16 and fp16 run the forward pass and the loss under ``torch.autocast``; fp16 also scales the loss
with a ``torch.amp.GradScaler`` so that small gradients do not underflow. The gradients are
unscaled (``scaler.unscale_``) before any norm is taken or any clipping rule runs, so the recorded
norms and the clipping act on the true gradients, never on ones 65,536x too large.

A step whose unscaled gradients hold inf/NaN is *skipped* by the scaler (no update; the scale is
halved): recorded as ``amp/skipped`` = 1 with that step's ``amp/scale``, named by the verdict, never
a failed run, unless the scaler skips ``MAX_CONSECUTIVE_SKIPS`` steps in a row (the scale has then
fallen by 2^64: the gradients are non-finite at any scale, the run has diverged).
"""
from __future__ import annotations

from typing import Optional

import torch

from gradsweep.names import AMP_SCALE, AMP_SKIPPED

PRECISIONS = ("32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_CONSECUTIVE_SKIPS = 64
AMP_METRICS = (AMP_SCALE, AMP_SKIPPED)  #: step values of an fp16 run, after the clip figures


class Precision:
    """What a precision changes in the step: the autocast context, and for fp16 the scaler."""

    def __init__(self, name: str, device: torch.device):
        self.name = str(name)
        self.device_type = device.type
        self.dtype: Optional[torch.dtype] = DTYPES.get(self.name)
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None
        self._one = torch.ones((), device=device)
        self.skipped_in_a_row = 0

    @property
    def metrics(self) -> tuple[str, ...]:
        return AMP_METRICS if self.scaler is not None else ()

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
        """Backward on the (scaled) loss, gradients unscaled; returns the scale this step used
        (a device tensor: ``scaler.scale`` of a one, no host sync), or None without a scaler."""
        if self.scaler is None:
            loss.backward()
            return None
        scale = self.scaler.scale(self._one).detach()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        return scale

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:  # skips the update when unscale_ found inf/NaN, then adjusts the scale
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
