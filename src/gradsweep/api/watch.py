"""``gradsweep.watch``: the product's gradient telemetry, clippers and verdicts in a training loop
of the user's own.

    with gradsweep.watch(model, clip={"name": "zclip"}, experiment_name="my-exp", run_name="baseline") as gs:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()
            gs.step(loss=loss)          # norms of this step, the clipper applied, everything recorded
            opt.step(); opt.zero_grad()

It records exactly what a job of ``src/train.py`` records (the metric-name contract, the dense
history, the sampled MLflow metrics, the ``grad_health`` verdict, the per-parameter figure) through
the same parts: one fused norm kernel, one host transfer and one binary journal record per step.
Call :meth:`Watch.step` once per optimizer step, after the gradients of all its micro-batches
are accumulated and before ``optimizer.step()``. Hydra is not involved.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from gradsweep.errors import ConfigError, NonFiniteError
from gradsweep.names import (CLIP_COEF, EXPERIMENT, FAILURE_REASON_TAG, FAILURE_STEP_TAG, FAILURE_TAG, GRAD_NORM,
                             GRAD_TOTAL, GRAD_TOTAL_CLIPPED, TRAIN_ACC, TRAIN_LOSS, grad_norm)
from gradsweep.report.hooks import run_figure
from gradsweep.track.history import default_uri
from gradsweep.track.logger import RunLogger, open_run_logger
from gradsweep.track.settings import TrackingConfig
from gradsweep.train.clipping import Clipper
from gradsweep.train.diagnostics import DiagnosticsConfig, record_health
from gradsweep.train.registry import build, parts
from gradsweep.train.sinks import HistorySink, TeeSink
from gradsweep.train.telemetry import GradientNorms, unwrapped


def clip_config(clip: Optional[dict[str, Any]]) -> Any:
    """``{"name": "norm", "max_norm": 5.0}`` -> the ``clip`` group's validated schema (the same
    keys and checks as ``clip=norm clip.max_norm=5`` on the command line)."""
    clip = dict(clip or {"name": "none"})
    name = clip.pop("name", "none")
    options = parts("clip")
    if name not in options:
        raise ConfigError(f"clip.name={name!r} is invalid; allowed: {'|'.join(sorted(options))}")
    schema = options[name].schema
    known = {f.name for f in fields(schema)} - {"name"}
    unknown = sorted(set(clip) - known)
    if unknown:
        raise ConfigError(f"clip.{unknown[0]}: not a key of clip={name}; allowed: {'|'.join(sorted(known))}")
    return schema(name=name, **clip)


class Watch:
    """One run of a loop of the user's own (see the module docstring). ``total_steps``: the planned
    number of optimizer steps, when known (MLflow's windows are then even; else they widen as the
    run goes, within the same bound)."""

    def __init__(self, model: nn.Module, clip: Optional[dict[str, Any]] = None, tracking_uri: Optional[str] = None,
                 experiment_name: str = EXPERIMENT, run_name: str = "watch", *, total_steps: int = 0,
                 params: Optional[dict[str, Any]] = None, tags: Optional[dict[str, str]] = None,
                 log_every_steps: int = 1, backend: str = "mlflow", max_points: int = 2500,
                 max_param_points: int = 250, param_groups: str = "tensor",
                 diagnostics: Optional[DiagnosticsConfig] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model={type(model).__name__}: not a torch.nn.Module; allowed: an nn.Module")
        self.model = model
        self.clip_cfg = clip_config(clip)
        self.clipper: Clipper = build("clip", self.clip_cfg)
        self.clip_metrics = tuple(getattr(self.clipper, "metrics", ()))
        self.tracking = TrackingConfig(backend=backend, uri=tracking_uri or default_uri(),
                                       experiment_name=experiment_name, max_points=max_points,
                                       max_param_points=max_param_points, param_groups=param_groups)
        self.run_name, self.total_steps = run_name, int(total_steps)
        self.params, self.tags = dict(params or {}), dict(tags or {})
        if log_every_steps < 1:
            raise ConfigError(f"log_every_steps={log_every_steps!r} is invalid; allowed: an integer >= 1")
        self.log_every_steps = log_every_steps
        self.diagnostics = diagnostics or DiagnosticsConfig()
        self.norms = GradientNorms(model)
        if not self.norms.names:
            raise ConfigError(f"model={type(model).__name__}: has no trainable parameters; allowed: a model with "
                              "parameters that require gradients")
        self.history = HistorySink()
        self.run: Optional[RunLogger] = None
        self.names: list[str] = []  #: the recorded step values, fixed by the first step()
        self.given: list[str] = []  #: what the first step() was given (loss, acc, extras)
        self.extra_names: list[str] = []
        self._total = 0
        self.steps = 0  #: optimizer steps recorded so far (the step of the next record)
        self.status: Optional[str] = None
        self._index = np.empty(1, np.int64)

    # ------------------------------------------------------------------------ the run
    def __enter__(self) -> "Watch":
        if self.run is not None:
            raise RuntimeError("gradsweep.watch: a Watch records one run; make a new one for another run")
        self.run = open_run_logger(self.tracking, self.run_name, {"gradsweep.api": "watch", **self.tags},
                                   hooks=(run_figure,))
        self.sink = TeeSink(self.history, self.run)
        self.run.log_params({**{f"clip.{k}": v for k, v in asdict(self.clip_cfg).items()}, **self.params})
        return self

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if self.run is None:
            return False
        if exc_type is None:
            self.status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            self.status = "KILLED"
        else:
            self.status = "FAILED"
            if isinstance(exc, NonFiniteError):
                self.run.set_tags({FAILURE_TAG: exc.tag, FAILURE_STEP_TAG: exc.step, FAILURE_REASON_TAG: str(exc)})
            else:
                self.run.set_tags({FAILURE_TAG: "exception", FAILURE_REASON_TAG: f"{exc_type.__name__}: {exc}"})
        try:
            record_health(self.history.history, self.diagnostics, unwrapped(self.model), None, self.run,
                          self.run.set_tags, self.run.run_ref)
            if self.history.rows and hasattr(self.run, "after_delivery"):  # drawn by the delivery process
                path = Path(tempfile.gettempdir()) / f"gradsweep-watch-{id(self):x}" / "grad_norms.png"
                self.run.after_delivery(run_figure, path=str(path), title=self.run_name, keep_local=False)
        finally:
            self.run.finish(self.status)
        return False  # the exception, if any, goes on to the caller

    @property
    def run_id(self) -> Optional[str]:
        """The run's id on the tracking store (once its delivery process has created it)."""
        return getattr(self.run, "run_id", None)

    # ----------------------------------------------------------------------- a step
    def step(self, loss: Optional[torch.Tensor | float] = None, acc: Optional[torch.Tensor | float] = None,
             **extra: torch.Tensor | float) -> None:
        """Record this optimizer step's gradients (and ``loss``, ``acc``, any ``extra`` scalars, named
        as given) and apply the clipper to them. The names recorded are fixed by the first call."""
        if self.run is None or self.status is not None:
            raise RuntimeError("gradsweep.watch(...).step() outside its `with` block")
        grads = self.norms.grads()
        per_param = self.norms.per_param(grads)
        total = self.norms.total(per_param)
        coef, total_clipped = self.clipper(self.norms, grads, total, per_param=per_param)
        device = total.device
        given = [k for k, v in (("loss", loss), ("acc", acc)) if v is not None] + sorted(extra)
        if not self.names:
            self._define(given)
        elif given != self.given:
            raise ValueError(f"gradsweep.watch: step() got {given}, the first step {self.given}: keep them the same")
        head = [*(_scalar(v, device) for v in (loss, acc) if v is not None), total, total_clipped, coef.reshape(())]
        parts_ = [torch.stack([t.detach().float() for t in head])]
        if self.clip_metrics:
            parts_.append(self.clipper.extra_values())
        parts_.append(per_param.float())
        if self.extra_names:
            parts_.append(torch.stack([_scalar(extra[k], device).float() for k in self.extra_names]))
        values = torch.cat(parts_).cpu().numpy()  # the step's single device-to-host transfer
        step = self.steps
        self.steps += 1
        loss_v = float(values[0]) if loss is not None else 0.0
        total_v = float(values[self._total])
        finite = math.isfinite(loss_v) and math.isfinite(total_v)
        if step % self.log_every_steps == 0 or not finite:
            self._index[0] = step
            self.sink.log_steps(self._index, values[None, :])
        if not math.isfinite(loss_v):
            raise NonFiniteError("loss", step)
        if not math.isfinite(total_v):
            raise NonFiniteError("grad", step)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        """Other values of the run (an evaluation: ``{"dev/acc": 0.9}``), at ``step`` (default: the
        last recorded step)."""
        if self.run is None or self.status is not None:
            raise RuntimeError("gradsweep.watch(...).log_metrics() outside its `with` block")
        self.sink.log_metrics(max(0, self.steps - 1) if step is None else step,
                              {k: float(v) for k, v in metrics.items()})

    def _define(self, given: list[str]) -> None:
        self.given = given
        self.extra_names = [k for k in given if k not in ("loss", "acc")]
        self.names = [*([TRAIN_LOSS] if "loss" in given else []), *([TRAIN_ACC] if "acc" in given else []),
                      GRAD_TOTAL, GRAD_TOTAL_CLIPPED, CLIP_COEF, *self.clip_metrics,
                      *(grad_norm(n) for n in self.norms.names)]
        clash = sorted(set(self.extra_names) & set(self.names)) or \
            [k for k in self.extra_names if k.startswith((GRAD_NORM, "clip/", "health/"))]
        if clash:
            raise ValueError(f"gradsweep.watch: step() extra {clash[0]!r} is a recorded name or uses a reserved "
                             "prefix (grad_norm/, clip/, health/)")
        self.names += self.extra_names
        self._total = self.names.index(GRAD_TOTAL)
        self.sink.define_steps(self.names, self.total_steps)


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    if value is None:
        return torch.full((), math.nan, device=device)
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device)
    return torch.tensor(float(value), device=device)


def watch(model: nn.Module, clip: Optional[dict[str, Any]] = None, tracking_uri: Optional[str] = None,
          experiment_name: str = EXPERIMENT, run_name: str = "watch", **kwargs: Any) -> Watch:
    """See :class:`Watch`. Use as a context manager: the run is open inside the ``with`` block."""
    return Watch(model, clip, tracking_uri, experiment_name, run_name, **kwargs)
