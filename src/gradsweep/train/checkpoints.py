"""Checkpoints: model, optimizer, step, best score, config and RNG/data-order state in one file.

Only plain containers and tensors are stored, so every load uses ``torch.load(weights_only=True)``.
Writes go to a temporary file first and are renamed into place: a killed process never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gradsweep.errors import CheckpointError
from gradsweep.locks import temporary_name

REQUIRED = ("model", "optimizer", "step", "best_score", "config")


class CheckpointStore:
    def __init__(self, folder: str | Path, on_save: Optional[Callable[[Path], None]] = None):
        self.folder = Path(folder)
        self.on_save = on_save  # e.g. upload to the tracking store as soon as it is written

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def save(self, name: str, state: dict[str, Any]) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(name)
        tmp = temporary_name(final)  # of this process alone: another writer never renames it away
        torch.save(state, tmp)
        os.replace(tmp, final)
        if self.on_save is not None:
            self.on_save(final)
        return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trainer.resume_from={str(path)!r}: checkpoint file not found")
    try:
        with warnings.catch_warnings():  # torch warns about a garbage file's "pickle protocol" before failing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean 'unreadable'
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable gradsweep checkpoint (corrupt or truncated?): "
                              f"{reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path}: not a gradsweep checkpoint; expected keys {', '.join(REQUIRED)}")
    return state


def check_compatible(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     ref: str) -> None:
    """A checkpoint resumes only into the model and optimizer it was written by: same parameter
    names and shapes, same parameter groups. Checked before any run is opened (a refusal is an
    input error, never a run left behind)."""
    saved, wanted = state["model"], model.state_dict()
    config = state.get("config") or {}
    was = ", ".join(f"{group}={(config.get(group) or {}).get('name', '?')}" for group in ("model", "data")) \
        if isinstance(config, dict) else "?"
    prefix = f"trainer.resume_from={ref!r}: the checkpoint is of another model ({was}"
    missing = [k for k in wanted if k not in saved]
    extra = [k for k in saved if k not in wanted]
    if missing or extra:
        detail = f"lacks {missing[0]}" if missing else f"has {extra[0]} that this model does not"
        raise CheckpointError(f"{prefix}): it {detail}; compose the job the checkpoint was written with")
    for key, tensor in wanted.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{prefix}): {key} is {list(saved[key].shape)} there and "
                                  f"{list(tensor.shape)} here; compose the job the checkpoint was written with")
    groups = state["optimizer"].get("param_groups", []) if isinstance(state["optimizer"], dict) else []
    sizes_saved = [len(g.get("params", [])) for g in groups]
    sizes_here = [len(g["params"]) for g in optimizer.param_groups]
    if sizes_saved != sizes_here:
        raise CheckpointError(f"trainer.resume_from={ref!r}: the optimizer state has parameter groups of sizes "
                              f"{sizes_saved}, this optimizer {sizes_here}")
