"""Checkpoints: model, optimizer, step, best score, config and RNG/data-order state in one file.

Only plain containers and tensors are stored, so every load uses ``torch.load(weights_only=True)``.
Writes go to a temporary file first and are renamed into place: a killed process never leaves a
truncated checkpoint behind.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gradsweep.errors import CheckpointError, first_line
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
        reason = first_line(e)
        raise CheckpointError(f"{path}: not a readable gradsweep checkpoint (corrupt or truncated?): "
                              f"{reason}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path}: not a gradsweep checkpoint; expected keys {', '.join(REQUIRED)}")
    return state


@dataclass(frozen=True)
class RunLength:
    """What a checkpoint's position must fit: the run it resumes into (:func:`gradsweep.train.loop.run_length`)."""

    examples: int  #: training examples: the length of a data order (``perm``)
    steps_per_epoch: int
    total_steps: int


def check_compatible(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     ref: str, length: RunLength, clipper: Optional[Any] = None,
                     best: Optional[dict[str, Any]] = None) -> None:
    """A checkpoint resumes only into the model and optimizer it was written by (same parameter
    names and shapes, same parameter groups), and only with content the loop can continue from:
    finite weights, a step within the run, a data order and RNG states that fit. Checked before any
    run is opened (a refusal is an input error, never a run left behind). ``optimizer`` and
    ``clipper``: throwaway ones, loaded here to try their state."""
    key = f"trainer.resume_from={ref!r}"
    config = state["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{key}: the checkpoint's config is a {type(config).__name__}; allowed: a mapping "
                              "(the config the run was written with)")
    _check_weights(state["model"], model, key, config)
    if best is not None:
        _check_weights(best.get("model"), model, f"{key} (its best.pt)", config)
    _check_optimizer(state["optimizer"], optimizer, key)
    _check_position(state, length, key)
    _check_rng(state.get("rng"), key)
    for name in ("clip", "amp"):  # optional: checkpoints written before rules had state have none
        if not isinstance(state.get(name) or {}, dict):
            raise CheckpointError(f"{key}: the checkpoint's {name} state is a {type(state[name]).__name__}; "
                                  "allowed: a mapping")
    clip = state.get("clip") or {}
    if clipper is not None and clip.get("rule") is not None and clip.get("rule") == clipper.state_dict().get("rule"):
        _try(lambda: clipper.load_state_dict(clip), key, f"clip state (of clip={clip['rule']})",
             "the state the rule saved")


def _try(load: Callable[[], object], key: str, what: str, allowed: str) -> None:
    try:
        load()
    except Exception as e:  # torch and the rules raise many types; all mean 'this state does not fit'
        reason = first_line(e)
        raise CheckpointError(f"{key}: the checkpoint's {what} does not fit this run ({reason}); "
                              f"allowed: {allowed}") from None


def _check_weights(saved: Any, model: torch.nn.Module, key: str, config: dict[str, Any]) -> None:
    """Same parameter names and shapes as ``model``; every value a finite tensor (a diverged run's
    NaN weights would train to NaN or be evaluated as if they were a model)."""
    wanted = model.state_dict()
    if not isinstance(saved, dict):
        raise CheckpointError(f"{key}: the checkpoint's model is a {type(saved).__name__}; allowed: a state_dict")
    was = ", ".join(f"{group}={_choice(config.get(group))}" for group in ("model", "data"))
    prefix = f"{key}: the checkpoint is of another model ({was}"
    missing = [k for k in wanted if k not in saved]
    extra = [k for k in saved if k not in wanted]
    if missing or extra:
        detail = f"lacks {missing[0]}" if missing else f"has {extra[0]} that this model does not"
        raise CheckpointError(f"{prefix}): it {detail}; compose the job the checkpoint was written with")
    for name, tensor in wanted.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key}: the checkpoint's {name} is a {type(value).__name__}; allowed: a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{prefix}): {name} is {list(value.shape)} there and "
                                  f"{list(tensor.shape)} here; compose the job the checkpoint was written with")
    for name, value in saved.items():  # another model is named first: its weights' values do not matter
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{key}: the checkpoint's {name} holds non-finite values (NaN or Inf); "
                                  "allowed: weights of a run that had not diverged (an earlier checkpoint)")


def _choice(group: Any) -> str:
    return str(group.get("name", "?")) if isinstance(group, dict) else "?"


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, key: str) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict) \
            or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{key}: the checkpoint's optimizer is not an optimizer state_dict; allowed: "
                              "a mapping with state and param_groups")
    sizes_saved = [len(g.get("params", [])) for g in groups]
    sizes_here = [len(g["params"]) for g in optimizer.param_groups]
    if sizes_saved != sizes_here:
        raise CheckpointError(f"{key}: the optimizer state has parameter groups of sizes "
                              f"{sizes_saved}, this optimizer {sizes_here}")
    for param, values in saved["state"].items():
        tensors = values.values() if isinstance(values, dict) else ()
        if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tensors):
            raise CheckpointError(f"{key}: the checkpoint's optimizer state of parameter {param} holds non-finite "
                                  "values (NaN or Inf); allowed: the state of a run that had not diverged")
    _try(lambda: optimizer.load_state_dict(saved), key, "optimizer state",
         "the state of the optimizer the job was written with")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_position(state: dict[str, Any], length: RunLength, key: str) -> None:
    """Where the loop goes on: a step within the run, a batch within an epoch, a data order of this
    run's training examples, a best score that is a number."""
    step, epoch, batch = state["step"], state.get("epoch", 0), state.get("batch", 0)
    if not _integer(step) or not 0 <= step <= length.total_steps:
        raise CheckpointError(f"{key}: the checkpoint's step is {step!r}; allowed: an integer from 0 to "
                              f"{length.total_steps} (this run's steps; a larger trainer.epochs runs longer)")
    if not _integer(epoch) or epoch < 0 or not _integer(batch) or not 0 <= batch < length.steps_per_epoch:
        raise CheckpointError(f"{key}: the checkpoint's position (epoch {epoch!r}, batch {batch!r}) does not fit "
                              f"this run; allowed: epoch >= 0 and a batch from 0 to {length.steps_per_epoch - 1} "
                              "(resume with the trainer.batch_size it was written with)")
    perm = state.get("perm")
    if perm is not None and not (isinstance(perm, torch.Tensor) and perm.dtype == torch.int64
                                 and tuple(perm.shape) == (length.examples,)
                                 and torch.equal(perm.sort().values, torch.arange(length.examples))):
        what = f"{perm.dtype} {list(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise CheckpointError(f"{key}: the checkpoint's data order (perm, {what}) does not fit this run; allowed: "
                              f"an order of its {length.examples} training examples (the data it was written with)")
    best, best_step = state["best_score"], state.get("best_step", -1)
    if not isinstance(best, (int, float)) or isinstance(best, bool) or math.isnan(best) or best == math.inf \
            or not _integer(best_step) or not -1 <= best_step <= step:
        raise CheckpointError(f"{key}: the checkpoint's best score {best!r} (step {best_step!r}) is invalid; "
                              "allowed: a number (-inf before any evaluation) at a step before the checkpoint's")


def _check_rng(rng: Any, key: str) -> None:
    if rng is None:
        return
    if not isinstance(rng, dict):
        raise CheckpointError(f"{key}: the checkpoint's rng is a {type(rng).__name__}; allowed: a mapping")
    for name in ("data", "torch"):  # both are CPU generator states (torch.Generator().get_state())
        if name in rng:
            _try(partial(torch.Generator().set_state, rng[name]), key, f"rng state {name!r}",
                 "a CPU generator's state (torch.Generator().get_state())")
