"""One training job: validated config -> factories -> loop, tracked as one MLflow run.

Everything that can be wrong with the input (config, data files, checkpoint) is checked before
the run is created, so bad input never leaves a run behind.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from gradsweep.checkpoints import CheckpointStore, load_checkpoint
from gradsweep.clipping import build_clipper
from gradsweep.config import JobSpec, to_objects
from gradsweep.data import build_data, read_digit_sum
from gradsweep.errors import CheckpointError, NonFiniteError
from gradsweep.loop import Trainer, TrainResult
from gradsweep.models import build_model
from gradsweep.optim import build_optimizer
from gradsweep.plots import plot_param_norms
from gradsweep.sinks import HistorySink, TeeSink
from gradsweep.tracker import SWEEP_TAG, Tracker, flatten
from gradsweep.tracking_uri import mask

log = logging.getLogger("gradsweep")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class JobContext:
    """What the job needs to know about how it was launched (filled in by the entry point)."""

    overrides: list[str] = field(default_factory=list)
    output_dir: Path = Path(".")
    parent_run_id: Optional[str] = None
    sweep_id: Optional[str] = None
    extra_tags: dict[str, str] = field(default_factory=dict)


@dataclass
class JobOutcome:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    objective: float  # best dev accuracy; nan when the run failed
    result: Optional[TrainResult] = None
    failure: Optional[str] = None
    history: Optional[HistorySink] = None
    error: Optional[Exception] = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends KILLED."""


def _raise_terminated(signum, frame):
    raise Terminated()


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def git_commit(cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config flattened to ``group.key`` params; credentials masked."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: (mask(v) if isinstance(v, str) and k.endswith("uri") else v) for k, v in params.items()}


def resolve_resume(ref: str, tracker_factory: Callable[[], Tracker], dest: Path) -> tuple[dict, Optional[dict], Optional[str]]:
    """``trainer.resume_from``: a checkpoint path or an MLflow run id. Returns (last, best, run id)."""
    path = Path(ref)
    if path.exists() or not RUN_ID.match(ref):
        best_path = path.with_name("best.pt")
        best = load_checkpoint(best_path) if best_path.is_file() and best_path != path else None
        return load_checkpoint(path), best, None
    tracker = tracker_factory()
    try:
        tracker.client.get_run(ref)
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: neither a checkpoint file nor a run in the tracking store") from None
    dest.mkdir(parents=True, exist_ok=True)
    try:
        last = tracker.client.download_artifacts(ref, "checkpoints/last.pt", str(dest))
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: run has no checkpoints/last.pt artifact") from None
    try:
        best = load_checkpoint(tracker.client.download_artifacts(ref, "checkpoints/best.pt", str(dest)))
    except Exception:
        best = None
    return load_checkpoint(last), best, ref


def check_inputs(spec: JobSpec) -> None:
    """Input files named by the config: the data folder and a checkpoint path (not run ids)."""
    path = getattr(spec.data, "path", None)
    if path:
        read_digit_sum(path)
    ref = spec.trainer.resume_from
    if ref and (Path(ref).exists() or not RUN_ID.match(ref)):
        load_checkpoint(ref)


def run_job(cfg: DictConfig, ctx: JobContext, on_eval: Optional[Callable[[int, float], None]] = None) -> JobOutcome:
    spec: JobSpec = to_objects(cfg)
    torch.manual_seed(spec.trainer.seed)
    data = build_data(spec.data)
    out_features = 1 if spec.trainer.loss == "bce" else data.num_classes
    model = build_model(spec.model, data, out_features)
    device = device_for(spec.trainer.device)
    model.to(device)
    make_tracker = lambda: Tracker(spec.tracking.uri, spec.tracking.experiment_name, spec.tracking.artifact_location)  # noqa: E731
    resume = resolve_resume(spec.trainer.resume_from, make_tracker, ctx.output_dir / "resume") \
        if spec.trainer.resume_from else None
    optimizer = build_optimizer(spec.optimizer, model.parameters())
    clipper = build_clipper(spec.clip)
    config_dict = OmegaConf.to_container(cfg, resolve=True)

    tracker = make_tracker()
    name = " ".join(o for o in ctx.overrides if not o.startswith("trainer.resume_from")) or "default"
    tags = {"gradsweep.overrides": " ".join(ctx.overrides), "model": spec.model.name, "data": spec.data.name,
            "clip": spec.clip.name, **ctx.extra_tags}
    if ctx.sweep_id:
        tags[SWEEP_TAG] = ctx.sweep_id
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if resume is not None and resume[2] is not None:
        run_id = resume[2]
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.set_tags(run_id, {"gradsweep.resumed_at_step": resume[0]["step"]})
    else:
        run_id = tracker.start_run(name, tags, ctx.parent_run_id)
        tracker.log_params(run_id, run_params(cfg))
        if resume is not None:
            tracker.set_tags(run_id, {"gradsweep.resumed_from": spec.trainer.resume_from})
    cfg_path = ctx.output_dir / "config.yaml"
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(run_id, cfg_path)

    history = HistorySink()
    sender = tracker.metric_sink(run_id, spec.tracking.flush_every_s)
    store = CheckpointStore(ctx.output_dir / "checkpoints")
    trainer = Trainer(model, data, optimizer, clipper, spec.trainer, TeeSink(history, sender), device, store,
                      config_dict, on_eval)
    if resume is not None:
        trainer.restore(resume[0], resume[1])
    if spec.trainer.checkpoint_every_steps and spec.tracking.log_checkpoints:
        store.on_save = lambda path: tracker.log_artifact(run_id, path, "checkpoints")
    log.info("run %s (%s) on %s: %s, %d steps", run_id, name, device, mask(tracker.uri), trainer.total_steps)

    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    status, failure, result, error = "FAILED", None, None, None
    try:
        result = trainer.run()
        status = "FINISHED"
    except NonFiniteError as e:
        failure, error = e.tag, e
        tracker.set_tags(run_id, {"failure": e.tag, "failure_step": e.step, "failure_reason": str(e)})
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        failure, error = "exception", e
        tracker.set_tags(run_id, {"failure": "exception", "failure_reason": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _close_run(tracker, run_id, sender, history, store, spec, status, name)
    if error is not None:
        log.error("run %s FAILED: %s", run_id, error)
        return JobOutcome(run_id, status, math.nan, None, failure, history, error)
    log.info("run %s FINISHED: best dev acc %.4f (step %d), test acc %.4f", run_id, result.best_dev_acc,
             result.best_step, result.test_acc)
    return JobOutcome(run_id, status, result.best_dev_acc, result, None, history)


def _close_run(tracker: Tracker, run_id: str, sender, history: HistorySink, store: CheckpointStore,
               spec: JobSpec, status: str, name: str) -> None:
    """Flush metrics, log figures and checkpoints, then set the final status (in that order)."""
    try:
        sender.close()
        if spec.tracking.log_figures and history.history:
            fig = plot_param_norms(history.history, store.folder.parent / "figures" / "grad_norms.png", title=name)
            tracker.log_artifact(run_id, fig, "figures")
        if spec.tracking.log_checkpoints:
            for ckpt in ("best", "last"):
                if store.path(ckpt).is_file():
                    tracker.log_artifact(run_id, store.path(ckpt), "checkpoints")
    finally:
        tracker.end_run(run_id, status)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and os.name == "posix"
