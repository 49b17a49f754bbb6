"""One training job: validated config -> factories -> loop, tracked as one MLflow run.

:func:`run_job` is four steps, each returning what the next needs: prepare (parts built, resume
resolved: :mod:`gradsweep.run.inputs`, :mod:`gradsweep.run.resume`), open the run, train, close the
run. Everything that can be wrong with the input (config, data files, checkpoint) is checked before
the run is created, so bad input never leaves a run behind.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
import yaml

from gradsweep.errors import ConfigError, NonFiniteError, StopRun
from gradsweep.locks import FOLDER_LOCK, Busy, hold, release
from gradsweep.names import (FAILURE_REASON_TAG, FAILURE_STEP_TAG, FAILURE_TAG, GIT_COMMIT_TAG, OUTPUT_DIR_TAG,
                             OVERRIDES_TAG, RESUMED_AT_TAG, RESUMED_FROM_TAG, RUN_ID, RUN_NAME_TAG, STOPPED_STEP_TAG,
                             STOPPED_TAG, SWEEP_TAG)
from gradsweep.run.inputs import data_and_model
from gradsweep.run.resume import Resume, check_resume, continue_history, resolve_resume, spool_for, tracker_for
from gradsweep.report.hooks import run_figure
from gradsweep.run.spec import JobSpec
from gradsweep.train.checkpoints import CheckpointStore
from gradsweep.train.diagnostics import Diagnosis, record_health
from gradsweep.train.loop import Trainer, TrainResult
from gradsweep.train.registry import build
from gradsweep.train.sinks import FromStep, HistorySink, TeeSink
from gradsweep.track.logger import RunLogger, open_run_logger
from gradsweep.track.uri import mask, mask_overrides

if TYPE_CHECKING:
    from gradsweep.run.parallel import Ranks
    from gradsweep.run.ranks import Tasks

log = logging.getLogger("gradsweep")


@dataclass
class JobContext:
    """What the job needs to know about how it was launched (filled in by the entry point)."""

    overrides: list[str] = field(default_factory=list)
    output_dir: Path = Path(".")
    parent_run_id: Optional[str] = None
    parent_local_id: Optional[str] = None  # the parent run's journal, when it was opened while the store was down
    sweep_id: Optional[str] = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    #: keys the whole sweep sets alike (e.g. trainer.epochs in `-m clip.max_norm=1,5 trainer.epochs=2`):
    #: left out of the run's name, which then says only what this run varies
    constant_keys: tuple[str, ...] = ()
    name: Optional[str] = None  #: the run's name when the launcher chose one (an Optuna trial's); else from overrides
    #: the job runs as several tasks of one scheduler step and this process is their rank 0 (their
    #: other ranks run :func:`gradsweep.run.rank.task_rank`); None: one process, which may spawn ranks
    tasks: Optional[Tasks] = None


NAME_NOISE = ("tracking.", "trainer.resume_from", "hydra.")  # never part of a run's name


def run_name(overrides: list[str], constant_keys: tuple[str, ...] = ()) -> str:
    """What the run varies, as its overrides (``clip.max_norm=5``); ``default`` when nothing does."""
    keep = [o for o in overrides
            if not o.lstrip("+~").startswith(NAME_NOISE) and o.split("=", 1)[0].lstrip("+~") not in constant_keys]
    return " ".join(keep) or "default"


def called(name: str, ref: str) -> str:
    """How the console names a run, from its first line to its last: its name, and the first 8
    characters of its id once the store has it (``clip.max_norm=5 (0aab2449)``)."""
    if RUN_ID.match(ref):
        return f"{name} ({ref[:8]})"
    return name if ref == name else f"{name} {ref}"


@dataclass
class JobOutcome:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    objective: float  # best dev accuracy; nan when the run failed
    result: Optional[TrainResult] = None
    failure: Optional[str] = None
    history: Optional[HistorySink] = None
    error: Optional[Exception] = None
    health: Optional[Diagnosis] = None  # gradient-health verdict (gradsweep.train.diagnostics)
    run: Optional[RunLogger] = None  # what the run recorded through (a MemoryRunLogger holds it all)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run ends KILLED."""


def raise_terminated(signum, frame):
    raise Terminated()


@dataclass
class Killed:
    """A run this process ended KILLED on Ctrl-C or SIGTERM, and how to go on with it."""

    name: str
    ref: str  # its id once the store has it
    step: int
    total_steps: int
    overrides: list[str]  # the job's command line (a sweep's job: its own overrides)
    resumable: bool  # a last checkpoint is in the run

    def command(self) -> str:
        """The command that resumes the run (in place, from its last checkpoint), else re-runs it."""
        import shlex

        keep = [o for o in self.overrides if not o.lstrip("+~").startswith(("hydra.", "trainer.resume_from"))]
        resume = [f"trainer.resume_from={self.ref}"] if self.resumable else []
        return shlex.join(["python", "src/train.py", *resume, *keep])


#: the runs this process ended KILLED, for the command's last lines (gradsweep.cli.hydra_main)
KILLED: list[Killed] = []


def _stop_between_steps(trainer: Trainer) -> Callable[[int, Any], None]:
    """A Ctrl-C/SIGTERM handler for the training loop: the first signal stops the loop after its
    step (so the run keeps a whole ``last`` checkpoint to resume from), a second one at once."""
    def handler(signum, frame):
        stop = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if trainer.stop is not None:
            raise stop
        trainer.stop = stop

    return handler


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


def hold_folder(folder: Path, key: str) -> Optional[int]:
    """Claim ``folder`` for this job or sweep until :func:`release` or this process ends: a second
    one given the same folder (two sweeps with one ``hydra.sweep.dir``) is refused with ConfigError
    before it writes anything. None where the folder cannot be written (the first write says so)."""
    try:
        return hold(folder / FOLDER_LOCK)
    except Busy as e:
        raise ConfigError(f"{key}={folder}: the folder is in use by another running job or sweep ({e}); allowed: "
                          "a folder no running job writes (e.g. the default, time-stamped one)") from None
    except OSError:
        return None


@contextmanager
def claim_folder(folder: Path, key: str) -> Iterator[None]:
    """A job's folder (its config.yaml, checkpoints/) is its own while it runs (:func:`hold_folder`)."""
    fd = hold_folder(folder, key)
    try:
        yield
    finally:
        release(fd)


def run_job(spec: JobSpec, ctx: JobContext, on_eval: Optional[Callable[[int, float], None]] = None) -> JobOutcome:
    with claim_folder(ctx.output_dir, "hydra.sweep.dir" if ctx.sweep_id else "hydra.run.dir"):
        return _run_job(spec, ctx, on_eval)


def _run_job(spec: JobSpec, ctx: JobContext, on_eval: Optional[Callable[[int, float], None]] = None) -> JobOutcome:
    job = _prepare(spec, ctx)
    opened = _open(spec, ctx, job, on_eval)
    trained = _train(spec, opened)  # ends the run, however training ends
    return _outcome(spec, opened, trained)


@dataclass
class Prepared:
    """A job before its run exists: its parts built, its resume resolved and checked."""

    data: Any
    model: torch.nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    clipper: Any
    resume: Optional[Resume]
    config: dict[str, Any]  # the job's config as recorded (config.yaml)


@dataclass
class Opened:
    """A job whose run exists and whose trainer is ready: from here on the run must be ended."""

    run: RunLogger
    name: str
    overrides: list[str]  # the job's overrides, passwords masked
    model: torch.nn.Module
    trainer: Trainer
    history: HistorySink
    store: CheckpointStore
    ranks: Optional[Ranks]


@dataclass
class Trained:
    """How training ended, and the run's gradient-health verdict."""

    status: str = "FAILED"  # FINISHED | FAILED | KILLED
    result: Optional[TrainResult] = None
    failure: Optional[str] = None
    error: Optional[Exception] = None
    health: Optional[Diagnosis] = None


def _prepare(spec: JobSpec, ctx: JobContext) -> Prepared:
    """Data, model, optimizer and clipper; a resume resolved and checked against them (a refused
    resume creates no run and changes no run's status)."""
    if spec.trainer.cpu_threads:
        torch.set_num_threads(spec.trainer.cpu_threads)
    torch.manual_seed(spec.trainer.seed)
    data, model = data_and_model(spec)
    device = device_for(spec.trainer.device)
    if ctx.tasks is not None:
        from gradsweep.run.rank import rank_device

        device = rank_device(device, ctx.tasks.local_rank)
    model.to(device)
    resume = None
    if spec.trainer.resume_from:
        downloads = ctx.output_dir / "resume"  # the run's checkpoints from the store: read, then removed
        try:
            resume = resolve_resume(spec.trainer.resume_from, lambda: tracker_for(spec), downloads,
                                    spool=spool_for(spec))
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
        check_resume(spec, resume, data, model)
    optimizer = build("optimizer", spec.optimizer, model.parameters())
    if resume is not None:
        if resume.status == "FINISHED":
            log.info("resume: run %s is FINISHED and stays as it is; a new run (tag %s) continues it from step %d",
                     spec.trainer.resume_from, RESUMED_FROM_TAG, resume.last["step"])
        elif resume.status:
            log.info("resume: run %s (%s) continues in place from step %d", spec.trainer.resume_from, resume.status,
                     resume.last["step"])
    return Prepared(data, model, device, optimizer, build("clip", spec.clip), resume, spec.public())


def _run_tags(spec: JobSpec, ctx: JobContext, overrides: list[str]) -> dict[str, str]:
    tags = {OVERRIDES_TAG: " ".join(overrides), "model": spec.model.name, "data": spec.data.name,
            "clip": spec.clip.name, OUTPUT_DIR_TAG: str(ctx.output_dir.resolve()), **ctx.extra_tags}
    if ctx.sweep_id:
        tags[SWEEP_TAG] = ctx.sweep_id
    commit = git_commit(Path.cwd())
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    return tags


def _open(spec: JobSpec, ctx: JobContext, job: Prepared, on_eval: Optional[Callable[[int, float], None]]) -> Opened:
    """Open the job's run (a new one, or the resumed run continued in place) and build its trainer.
    Whatever stops this once the run exists ends the run (KILLED on Ctrl-C, else FAILED), never
    leaves it RUNNING."""
    overrides = mask_overrides(ctx.overrides)
    name = ctx.name or run_name(overrides, ctx.constant_keys)
    tags = _run_tags(spec, ctx, overrides)
    resume = job.resume
    same_run = resume.run_id if resume is not None else None
    ranks = None
    run = open_run_logger(spec.tracking, name, tags, parent_run_id=ctx.parent_run_id,
                          parent_local_id=ctx.parent_local_id, run_id=same_run,
                          hooks=(run_figure,) if spec.tracking.log_figures else ())
    try:
        _record_start(spec, ctx, run, resume, tags[OUTPUT_DIR_TAG], job.config)
        history = HistorySink()
        store = CheckpointStore(ctx.output_dir / "checkpoints")
        if spec.trainer.devices > 1 or ctx.tasks is not None:  # ranks 1..N-1 join here and end with the run
            from gradsweep.run.parallel import Ranks
            from gradsweep.run.ranks import Spawned

            ranks = Ranks(spec, job.device, resume.last if resume is not None else None,
                          ctx.tasks or Spawned(spec.trainer.devices))
        # steps the run already holds (logged after its last checkpoint, before it was killed) are not sent twice
        to_store = FromStep(run, resume.logged) if resume is not None and same_run else run
        trainer = Trainer(job.model, job.data, job.optimizer, job.clipper, spec.trainer, TeeSink(history, to_store),
                          job.device, store, job.config, on_eval, ranks.parallel if ranks is not None else None)
        if resume is not None:
            trainer.restore(resume.last, resume.best)
            continue_history(history, resume, trainer)
        if spec.trainer.checkpoint_every_steps and spec.tracking.log_checkpoints:
            store.on_save = lambda path: run.log_artifact(path, "checkpoints", move=_move(spec))
        log.info("run %s on %s: %s, %d steps", called(name, run.run_ref), job.device, mask(spec.tracking.uri),
                 trainer.total_steps)
    except BaseException as e:
        if ranks is not None:
            ranks.close()
        killed = isinstance(e, KeyboardInterrupt)
        if not killed:
            run.set_tags(_exception_tags(e))
        run.finish("KILLED" if killed else "FAILED")
        raise
    return Opened(run, name, overrides, job.model, trainer, history, store, ranks)


def _record_start(spec: JobSpec, ctx: JobContext, run: RunLogger, resume: Optional[Resume], output_dir: str,
                  config: dict[str, Any]) -> None:
    """What a run records before training: a run continued in place is RUNNING again without the
    tags of how its killed writer ended; a new run gets the params (and what it continues). Then
    the job's config.yaml."""
    if resume is not None and resume.run_id:
        client = tracker_for(spec).client
        client.update_run(resume.run_id, status="RUNNING")
        stale = set(client.get_run(resume.run_id).data.tags) & {FAILURE_TAG, FAILURE_STEP_TAG, FAILURE_REASON_TAG}
        for tag in stale:  # how its killed writer ended (e.g. worker_died) no longer describes it
            client.delete_tag(resume.run_id, tag)
        run.set_tags({RESUMED_AT_TAG: resume.last["step"], OUTPUT_DIR_TAG: output_dir})
    else:
        run.log_params(spec.params())
        if resume is not None:
            run.set_tags({RESUMED_FROM_TAG: spec.trainer.resume_from})
    cfg_path = ctx.output_dir / "config.yaml"
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run.log_artifact(cfg_path)


def _train(spec: JobSpec, job: Opened) -> Trained:
    """Train, the first Ctrl-C/SIGTERM stopping after its step; then end the run (:func:`_close`),
    however training ended. A Ctrl-C or an unexpected error is raised again once the run is ended."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(sig, _stop_between_steps(job.trainer)) for sig in signals] if main_thread() else None
    out, interrupted = Trained(), False
    try:
        out.result = job.trainer.run()
        out.status = "FINISHED"
    except NonFiniteError as e:
        out.failure, out.error = e.tag, e
        job.run.set_tags({FAILURE_TAG: e.tag, FAILURE_STEP_TAG: e.step, FAILURE_REASON_TAG: str(e)})
    except StopRun as e:  # on_eval stopped the run on purpose (an Optuna pruner): not FAILED, not KILLED
        # (the MLflow UI draws both as a red cross); FINISHED, named and tagged as stopped. MLflow has no
        # "pruned" status, and what the run recorded up to its stop is complete.
        out.status, out.error = "FINISHED", e
        job.run.set_tags({STOPPED_TAG: e.reason, STOPPED_STEP_TAG: e.step, RUN_NAME_TAG: f"{job.name} ({e.reason})"})
    except KeyboardInterrupt:
        out.status, interrupted = "KILLED", True
        raise
    except Exception as e:
        error = job.ranks.lost(e) if job.ranks is not None else e
        out.failure, out.error = "exception", error
        job.run.set_tags(_exception_tags(error))
        if error is not e:
            raise error from e
        raise
    finally:
        if job.ranks is not None:
            job.ranks.close()
        if previous is not None:
            for sig, handler in zip(signals, previous, strict=True):
                signal.signal(sig, handler)
        out.health = _close(spec, job, out.status, interrupted)
    return out


def _close(spec: JobSpec, job: Opened, status: str, interrupted: bool) -> Optional[Diagnosis]:
    """The run's end: its gradient-health verdict, figures and checkpoints, its status; a run ended
    by Ctrl-C/SIGTERM is listed in :data:`KILLED` with how to go on with it."""
    run, trainer = job.run, job.trainer
    health = record_health(job.history.history, spec.diagnostics, job.model, trainer.train_x, run, run.set_tags,
                           called(job.name, run.run_ref))
    logged_last = _close_run(run, job.history, job.store, spec, status, job.name)
    if interrupted:
        KILLED.append(Killed(job.name, run.run_ref, trainer.step, trainer.total_steps, job.overrides,
                             bool(RUN_ID.match(run.run_ref)) and logged_last))
    return health


def _outcome(spec: JobSpec, job: Opened, trained: Trained) -> JobOutcome:
    """The job's outcome, said on the console."""
    run, status, error, result = job.run, trained.status, trained.error, trained.result
    who = called(job.name, run.run_ref)
    if error is not None:
        log.log(logging.INFO if isinstance(error, StopRun) else logging.ERROR, "run %s %s: %s", who, status, error)
        return JobOutcome(run.run_ref, status, math.nan, None, trained.failure, job.history, error, trained.health,
                          run)
    assert result is not None  # no error: trainer.run() returned
    if spec.trainer.loss == "mse":
        log.info("run %s FINISHED: best dev loss %.4g (step %d), test loss %.4g", who, -result.best_dev_acc,
                 result.best_step, result.test_loss)
    else:
        log.info("run %s FINISHED: best dev acc %.4f (step %d), test acc %.4f", who, result.best_dev_acc,
                 result.best_step, result.test_acc)
    return JobOutcome(run.run_ref, status, result.best_dev_acc, result, None, job.history, health=trained.health,
                      run=run)


def _move(spec: JobSpec) -> bool:
    """Whether the job folder's checkpoints and figures go to the store rather than stay there as well."""
    return not spec.tracking.keep_local_artifacts


def _close_run(run: RunLogger, history: HistorySink, store: CheckpointStore, spec: JobSpec, status: str,
               name: str) -> bool:
    """Figures and checkpoints, then the final status; then deliver what is left (in that order).
    True when a ``last`` checkpoint was logged (the run can be resumed by its id)."""
    logged_last = False
    try:
        if spec.tracking.log_figures and history.history:
            path = (store.folder.parent / "figures" / "grad_norms.png").resolve()
            draw_later = getattr(run, "after_delivery", None)
            if draw_later is not None:  # the mlflow backend: its delivery process draws the figure from
                draw_later(run_figure, path=str(path), title=name,  # the journal, off the training path
                           keep_local=spec.tracking.keep_local_artifacts)
            else:
                from gradsweep.report.figures import plot_param_norms  # matplotlib: only when a figure is drawn

                run.log_artifact(plot_param_norms(history.history, path, title=name), "figures", move=_move(spec))
        if spec.tracking.log_checkpoints:
            for ckpt in ("best", "last"):
                if store.path(ckpt).is_file():
                    run.log_artifact(store.path(ckpt), "checkpoints", move=_move(spec))
                    logged_last = logged_last or ckpt == "last"
    finally:
        run.finish(status)
    return logged_last


def _exception_tags(e: BaseException) -> dict[str, str]:
    return {FAILURE_TAG: "exception", FAILURE_REASON_TAG: f"{type(e).__name__}: {e}"}


def main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and os.name == "posix"
