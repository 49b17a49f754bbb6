"""One training job: validated config -> factories -> loop, tracked as one MLflow run.

Everything that can be wrong with the input (config, data files, checkpoint) is checked before
the run is created, so bad input never leaves a run behind.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import torch
import yaml

from gradsweep.errors import CheckpointError, ConfigError, NonFiniteError, StopRun
from gradsweep.locks import FOLDER_LOCK, Busy, hold, release
from gradsweep.names import (FAILURE_REASON_TAG, FAILURE_STEP_TAG, FAILURE_TAG, GIT_COMMIT_TAG, OUTPUT_DIR_TAG,
                             OVERRIDES_TAG, RESUMED_AT_TAG, RESUMED_FROM_TAG, RUN_ID, RUN_NAME_TAG, STOPPED_STEP_TAG,
                             STOPPED_TAG, SWEEP_TAG)
from gradsweep.report.hooks import run_figure
from gradsweep.run.spec import JobSpec
from gradsweep.train import budget
from gradsweep.train.checkpoints import CheckpointStore, check_compatible, load_checkpoint
from gradsweep.train.data import read_digit_sum
from gradsweep.train.diagnostics import Diagnosis, record_health
from gradsweep.train.loop import Trainer, TrainResult, run_length
from gradsweep.train.registry import build
from gradsweep.train.user_code import check_task
from gradsweep.train.sinks import FromStep, HistorySink, TeeSink
from gradsweep.track.logger import RunLogger, open_run_logger
from gradsweep.track.uri import check_local_store, mask, mask_overrides

if TYPE_CHECKING:
    from gradsweep.track.store import Tracker

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


@dataclass
class Resume:
    last: dict  # the checkpoint to continue from
    best: Optional[dict]  # the best checkpoint so far, if there is one
    run_id: Optional[str] = None  # continue this run (resume_from was a run id)
    logged: dict[str, int] = field(default_factory=dict)  # metric -> last step the run holds (may be beyond `last`)
    history: Optional[Any] = None  # the run's dense history so far (a DataFrame), for a verdict over the whole run
    status: Optional[str] = None  # the status of the run resumed from (resume_from was a run id)


def resolve_resume(ref: str, tracker_factory: Callable[[], "Tracker"], dest: Path, last_only: bool = False,
                   spool: Optional[Path] = None) -> Resume:
    """``trainer.resume_from``: a checkpoint path (a new run) or an MLflow run id: the same run where it
    did not finish (KILLED, FAILED, RUNNING with its writer dead), a new run continuing it where it did
    (FINISHED: its history is not rewritten; the sweep that summarised it still describes it).
    ``last_only``: the checkpoints (preflight's check), not the steps the run holds.
    ``spool``: where a killed writer of the run may have left records."""
    path = Path(ref)
    if path.exists() or not RUN_ID.match(ref):
        best_path = path.with_name("best.pt")
        best = load_checkpoint(best_path) if best_path.is_file() and best_path != path else None
        return Resume(load_checkpoint(path), best)
    client = tracker_factory().client
    try:
        run = client.get_run(ref)
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: neither a checkpoint file nor a run in the "
                              "tracking store") from None
    if spool is not None:  # continuing it: this process is its only writer from here (refused if not)
        from gradsweep.track.store import claim_run, refuse_live_writer

        claim_run(spool, ref)
        refuse_live_writer(spool, run)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        last = client.download_artifacts(ref, "checkpoints/last.pt", str(dest))
    except Exception:
        raise CheckpointError(f"trainer.resume_from={ref!r}: run has no checkpoints/last.pt artifact") from None
    finished = run.info.status == "FINISHED"
    try:
        best_file = client.download_artifacts(ref, "checkpoints/best.pt", str(dest))
    except Exception:
        best = None
    else:  # there but unreadable: refused like the last checkpoint
        best = load_checkpoint(best_file)
    if last_only:
        return Resume(load_checkpoint(last), best, None if finished else ref, status=run.info.status)
    from gradsweep.track.store import metric_history

    from gradsweep.track.history import read_history

    if finished:  # a new run: it holds nothing yet, and its verdict also covers the original's steps
        return Resume(load_checkpoint(last), best, None, history=read_history(client, ref), status=run.info.status)
    if spool is not None:
        from gradsweep.track.store import hand_over

        hand_over(spool, ref)
    logged = {key: max(metric_history(client, ref, key)[0], default=-1) for key in run.data.metrics}
    dense = read_history(client, ref)
    if dense is not None:  # the steps it holds beyond its sampled metrics' last point are not sent again
        last_dense = int(dense.index.max())
        logged.update({key: max(logged.get(key, -1), last_dense) for key in dense.columns})
    return Resume(load_checkpoint(last), best, ref, logged, dense, run.info.status)


def check_inputs(spec: JobSpec, claim: bool = True) -> None:
    """Files named by the config: the data folder, the embedded store and spool (writable), and the
    checkpoint to resume from (a file, or a run's last checkpoint) and whether it fits the model.
    ``claim``: this process is the one that will continue a run given by id (not a sweep's launcher)."""
    path = getattr(spec.data, "path", None)
    budget.check_data(spec.data, spec.trainer.memory_limit_gb)  # before reading a 3 GB file
    if path:
        read_digit_sum(path)
    if spec.tracking.backend == "mlflow":
        check_local_store(spec.tracking.uri, spec.tracking.spool_dir)
    ref = spec.trainer.resume_from
    if claim and ref and RUN_ID.match(ref) and not Path(ref).exists() and spec.tracking.backend == "mlflow":
        from gradsweep.track.store import claim_run

        spool = _spool(spec)
        assert spool is not None  # backend mlflow: a spool folder
        claim_run(spool, ref)  # before reading the store: a run another live process resumes is not ours
    if not ref:
        if "custom" in (spec.model.name, spec.data.name):  # the user's code: imported and tried on two examples
            data_and_model(spec)
        else:  # the model's memory, estimated on the meta device: a bomb is refused before any folder exists
            check_model_budget(spec, _preflight_data(spec))
        return
    with tempfile.TemporaryDirectory(prefix="gradsweep-resume-") as tmp:
        resume = resolve_resume(ref, lambda: _tracker(spec.tracking.uri, spec.tracking.experiment_name,
                                                      spec.tracking.artifact_location), Path(tmp), last_only=True)
    check_resume(spec, resume, *data_and_model(spec))


def check_resume(spec: JobSpec, resume: Resume, data, model: torch.nn.Module) -> None:
    """The checkpoints' whole content against this job (:func:`check_compatible`), with a throwaway
    optimizer and clipper to try their states on."""
    assert spec.trainer.resume_from  # a resume is only resolved for a job that names one
    check_compatible(resume.last, model, build("optimizer", spec.optimizer, model.parameters()),
                     spec.trainer.resume_from, run_length(len(data.train), spec.trainer), build("clip", spec.clip),
                     resume.best)


_DATA_SEEN: dict[str, object] = {}  # preflight: each distinct data config is built once per command


def _preflight_data(spec: JobSpec):
    key = repr(spec.data)
    if key not in _DATA_SEEN:
        _DATA_SEEN[key] = build("data", spec.data)
    return _DATA_SEEN[key]


def _model_maker(spec: JobSpec, data) -> Callable[[], torch.nn.Module]:
    return lambda: build("model", spec.model, data, 1 if spec.trainer.loss == "bce" else data.num_classes)


def check_model_budget(spec: JobSpec, data) -> None:
    budget.check_model(_model_maker(spec, data), spec.model, data.train.x, spec.trainer.batch_size or len(data.train),
                       getattr(spec.optimizer, "name", ""), spec.trainer.memory_limit_gb)


def data_and_model(spec: JobSpec) -> tuple:
    """The job's data and model; a model or data of the user's own is checked on two examples
    (its outputs must fit ``trainer.loss``) before anything is recorded. Neither is made when the
    config's estimate is past ``trainer.memory_limit_gb`` (:mod:`gradsweep.train.budget`)."""
    budget.check_data(spec.data, spec.trainer.memory_limit_gb)
    data = build("data", spec.data)
    check_model_budget(spec, data)
    model = _model_maker(spec, data)()
    if "custom" in (spec.model.name, spec.data.name):
        custom = spec.model if spec.model.name == "custom" else spec.data
        key = "model._target_" if custom is spec.model else "data._target_"
        # getattr: only the custom configs declare _target_, not the ModelConfig/DataConfig types
        check_task(model, data, spec.trainer.loss, key, getattr(custom, "_target_"))  # noqa: B009
    return data, model



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
    if spec.trainer.cpu_threads:
        torch.set_num_threads(spec.trainer.cpu_threads)
    torch.manual_seed(spec.trainer.seed)
    data, model = data_and_model(spec)
    device = device_for(spec.trainer.device)
    model.to(device)
    make_tracker = lambda: _tracker(spec.tracking.uri, spec.tracking.experiment_name, spec.tracking.artifact_location)  # noqa: E731
    resume = None
    if spec.trainer.resume_from:
        downloads = ctx.output_dir / "resume"  # the run's checkpoints from the store: read, then removed
        try:
            resume = resolve_resume(spec.trainer.resume_from, make_tracker, downloads, spool=_spool(spec))
        finally:
            shutil.rmtree(downloads, ignore_errors=True)
    if resume is not None:  # input validation: a refused resume creates no run, changes no run's status
        check_resume(spec, resume, data, model)
    optimizer = build("optimizer", spec.optimizer, model.parameters())
    if resume is not None:
        if resume.status == "FINISHED":
            log.info("resume: run %s is FINISHED and stays as it is; a new run (tag %s) continues it from step %d",
                     spec.trainer.resume_from, RESUMED_FROM_TAG, resume.last["step"])
        elif resume.status:
            log.info("resume: run %s (%s) continues in place from step %d", spec.trainer.resume_from, resume.status,
                     resume.last["step"])
    clipper = build("clip", spec.clip)
    config_dict = spec.public()

    overrides = mask_overrides(ctx.overrides)
    name = ctx.name or run_name(overrides, ctx.constant_keys)
    tags = {OVERRIDES_TAG: " ".join(overrides), "model": spec.model.name, "data": spec.data.name,
            "clip": spec.clip.name, OUTPUT_DIR_TAG: str(ctx.output_dir.resolve()), **ctx.extra_tags}
    if ctx.sweep_id:
        tags[SWEEP_TAG] = ctx.sweep_id
    commit = git_commit(Path.cwd())
    if commit:
        tags[GIT_COMMIT_TAG] = commit
    same_run = resume.run_id if resume is not None else None
    ranks = None
    run = open_run_logger(spec.tracking, name, tags, parent_run_id=ctx.parent_run_id,
                          parent_local_id=ctx.parent_local_id, run_id=same_run,
                          hooks=(run_figure,) if spec.tracking.log_figures else ())
    try:  # from here on the run exists: whatever stops the job before training ends it, never leaves it RUNNING
        if resume is not None and same_run:
            client = make_tracker().client
            client.update_run(same_run, status="RUNNING")
            stale = set(client.get_run(same_run).data.tags) & {FAILURE_TAG, FAILURE_STEP_TAG, FAILURE_REASON_TAG}
            for tag in stale:  # how its killed writer ended (e.g. worker_died) no longer describes it
                client.delete_tag(same_run, tag)
            run.set_tags({RESUMED_AT_TAG: resume.last["step"], OUTPUT_DIR_TAG: tags[OUTPUT_DIR_TAG]})
        else:
            run.log_params(spec.params())
            if resume is not None:
                run.set_tags({RESUMED_FROM_TAG: spec.trainer.resume_from})
        cfg_path = ctx.output_dir / "config.yaml"
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(config_dict, sort_keys=False))
        run.log_artifact(cfg_path)

        history = HistorySink()
        store = CheckpointStore(ctx.output_dir / "checkpoints")
        if spec.trainer.devices > 1:  # ranks 1..N-1 start here and end with the run, whatever ends it
            from gradsweep.run.parallel import Ranks

            ranks = Ranks(spec, device, resume.last if resume is not None else None)
        # steps the run already holds (logged after its last checkpoint, before it was killed) are not sent twice
        to_store = FromStep(run, resume.logged) if resume is not None and same_run else run
        trainer = Trainer(model, data, optimizer, clipper, spec.trainer, TeeSink(history, to_store), device, store,
                          config_dict, on_eval, ranks.parallel if ranks is not None else None)
        if resume is not None:
            trainer.restore(resume.last, resume.best)
            _continue_history(history, resume, trainer)
        if spec.trainer.checkpoint_every_steps and spec.tracking.log_checkpoints:
            store.on_save = lambda path: run.log_artifact(path, "checkpoints", move=_move(spec))
        log.info("run %s on %s: %s, %d steps", called(name, run.run_ref), device, mask(spec.tracking.uri),
                 trainer.total_steps)
    except BaseException as e:
        if ranks is not None:
            ranks.close()
        killed = isinstance(e, KeyboardInterrupt)
        if not killed:
            run.set_tags(_exception_tags(e))
        run.finish("KILLED" if killed else "FAILED")
        raise

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(sig, _stop_between_steps(trainer)) for sig in signals] if main_thread() else None
    status, interrupted = "FAILED", False
    failure: Optional[str] = None
    result: Optional[TrainResult] = None
    error: Optional[Exception] = None
    try:
        result = trainer.run()
        status = "FINISHED"
    except NonFiniteError as e:
        failure, error = e.tag, e
        run.set_tags({FAILURE_TAG: e.tag, FAILURE_STEP_TAG: e.step, FAILURE_REASON_TAG: str(e)})
    except StopRun as e:  # on_eval stopped the run on purpose (an Optuna pruner): not FAILED, not KILLED
        # (the MLflow UI draws both as a red cross); FINISHED, named and tagged as stopped. MLflow has no
        # "pruned" status, and what the run recorded up to its stop is complete.
        status, error = "FINISHED", e
        run.set_tags({STOPPED_TAG: e.reason, STOPPED_STEP_TAG: e.step, RUN_NAME_TAG: f"{name} ({e.reason})"})
    except KeyboardInterrupt:
        status, interrupted = "KILLED", True
        raise
    except Exception as e:
        failure, error = "exception", ranks.lost(e) if ranks is not None else e
        run.set_tags(_exception_tags(error))
        if error is not e:
            raise error from e
        raise
    finally:
        if ranks is not None:
            ranks.close()
        if previous is not None:
            for sig, handler in zip(signals, previous, strict=True):
                signal.signal(sig, handler)
        health = record_health(history.history, spec.diagnostics, model, trainer.train_x, run, run.set_tags,
                               called(name, run.run_ref))
        logged_last = _close_run(run, history, store, spec, status, name)
        if interrupted:
            KILLED.append(Killed(name, run.run_ref, trainer.step, trainer.total_steps, overrides,
                                 bool(RUN_ID.match(run.run_ref)) and logged_last))
    who = called(name, run.run_ref)
    if error is not None:
        log.log(logging.INFO if isinstance(error, StopRun) else logging.ERROR, "run %s %s: %s", who, status, error)
        return JobOutcome(run.run_ref, status, math.nan, None, failure, history, error, health, run)
    assert result is not None  # no error: trainer.run() returned
    if spec.trainer.loss == "mse":
        log.info("run %s FINISHED: best dev loss %.4g (step %d), test loss %.4g", who, -result.best_dev_acc,
                 result.best_step, result.test_loss)
    else:
        log.info("run %s FINISHED: best dev acc %.4f (step %d), test acc %.4f", who, result.best_dev_acc,
                 result.best_step, result.test_acc)
    return JobOutcome(run.run_ref, status, result.best_dev_acc, result, None, history, health=health, run=run)


def _continue_history(history: HistorySink, resume: Resume, trainer: Trainer) -> None:
    """A resumed run (in place, or a new run continuing a FINISHED one): the steps before the
    checkpoint, from the resumed run's dense history, so the verdict and ``health/*`` cover the
    whole run, not only the steps after the resume."""
    dense = resume.history
    if dense is None or list(dense.columns) != trainer.names:
        return
    before = dense[dense.index < trainer.step]
    history.define_steps(trainer.names, trainer.total_steps)
    history.log_steps(before.index.to_numpy(dtype=np.int64), before.to_numpy(dtype=np.float32))


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


def _spool(spec: JobSpec) -> Optional[Path]:
    if spec.tracking.backend != "mlflow":
        return None
    from gradsweep.track.store import spool_of

    return spool_of(spec.tracking)


def _tracker(uri: str, experiment_name: str, artifact_location: Optional[str]) -> "Tracker":
    from gradsweep.track.store import Tracker  # MLflow: only to resume from a run id

    return Tracker(uri, experiment_name, artifact_location)


def main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread() and os.name == "posix"
