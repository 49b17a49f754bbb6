"""The sweep loop of gradsweep's Optuna sweeper (ask -> launch Hydra jobs -> tell) and the study summary.

Per batch of ``n_jobs`` trials: ask Optuna, launch one Hydra job per trial through the configured
launcher (each job finds its trial through :mod:`gradsweep.sweep.optuna_trial`), then tell Optuna how
each ended:

======================================  ==========  =================================================================
job                                     Optuna      MLflow child run
======================================  ==========  =================================================================
returned a finite best dev accuracy     COMPLETE    FINISHED
pruned (raised ``TrialPruned``)         PRUNED      FINISHED, name ``... (pruned)``, tag ``gradsweep.stopped=pruned``
diverged (returned NaN) or raised       FAIL        FAILED, tag ``failure``
======================================  ==========  =================================================================

and tag the child run ``optuna.state``. At the end (also after an error or Ctrl-C) the MLflow
parent run of the invocation gets the study's best params and value, ``optuna/trials.csv`` and
Optuna's figures.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy
import optuna
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from mlflow.entities import Metric, Param, RunTag
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from gradsweep.compat.hydra import job_exception
from gradsweep.compat.optuna import OptunaSweeperImpl, params_from_overrides, trial_id
from gradsweep.errors import ConfigError, GradsweepError, first_line
from gradsweep.labels import params_text, trial_label
from gradsweep.names import STUDY_TAG, TRIAL_NUMBER_TAG, TRIAL_STATE_TAG
from gradsweep.sweep.context import SweepContext
from gradsweep.sweep.nodes import plain_dict_or_none
from gradsweep.sweep.optuna_storage import make_pruner, make_storage, resolve_storage_url
from gradsweep.sweep.optuna_trial import register_live, unregister_live
from gradsweep.sweep.trial_lines import trial_lines
from gradsweep.sweep.optuna_stale import FAILURE_ATTR, Heartbeat, fail_stale
from gradsweep.track.journal import worker_id
from gradsweep.track.uri import mask

if TYPE_CHECKING:
    from gradsweep.track.tracker import Tracker

log = logging.getLogger("gradsweep")
RUN_ID_ATTR = "mlflow_run_id"
SWEEP_ATTR = "gradsweep_sweep_id"
FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "slice", "intermediate_values")


class TooManyFailedTrials(GradsweepError):
    """More trials failed than ``hydra.sweeper.max_failure_rate`` allows."""


# ----------------------------------------------------------------------------------- sweep
class GradsweepOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, pruner: Optional[DictConfig] = None, sampler_cfg: Optional[DictConfig] = None,
                 figures: bool = True, heartbeat_interval: int = 30, grace_period: Optional[int] = None) -> None:
        super().__init__(*args)
        self.figures = figures
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.pruner_cfg = plain_dict_or_none(pruner)
        self.sampler_cfg = plain_dict_or_none(sampler_cfg)
        self.tracker: Optional[Tracker] = None  # MLflow, opened lazily (a summary must not stop the study)

    def _configure_trials(self, trials: list[optuna.trial.Trial], *args: Any) -> Sequence[Sequence[str]]:
        """The plugin's overrides plus the job's sweep context (study, trial id and the run's short name)."""
        overrides = super()._configure_trials(trials, *args)
        return [tuple(ov) + (self.context.with_(trial_id=trial_id(t), run_name=trial_label(t.number, t.params)
                                                ).job_override(),)
                for t, ov in zip(trials, overrides, strict=True)]

    # The plugin's sweep() is one method that creates the study without a pruner, tells COMPLETE for
    # every return value and FAIL only for exceptions, checks the failure rate per batch and numbers
    # jobs from 0 on every invocation; none of that can be hooked, so this method replaces it. The
    # search-space parsing, grid handling and trial configuration are the plugin's.
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid = isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler
        space, fixed_params, fixed_overrides = params_from_overrides(params_conf)
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        for name in fixed_params:
            space.pop(name, None)
        directions: list[Any] = self._get_directions()  # 'minimize' | 'maximize', checked below
        if len(directions) != 1:
            raise ConfigError(f"hydra.sweeper.direction={directions} is invalid; allowed: maximize|minimize "
                              "(train.py returns one objective)")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials}, n_jobs={self.n_jobs} are invalid; "
                              "allowed: integers >= 1")

        for key in ("heartbeat_interval", "grace_period"):
            value = getattr(self, key)
            if not (value is None and key == "grace_period") and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"hydra.sweeper.{key}={value} is invalid; allowed: an integer >= 1 (seconds)"
                                  + (" or null" if key == "grace_period" else ""))
        storage_url = resolve_storage_url(self.storage)
        try:
            storage = make_storage(storage_url, self.heartbeat_interval, self.grace_period)
            study = optuna.create_study(study_name=self.study_name, storage=storage,
                                        sampler=self.sampler, pruner=make_pruner(self.pruner_cfg),
                                        directions=directions, load_if_exists=True)
        except (ImportError, OSError, ValueError, SQLAlchemyError) as e:  # bad URL, no driver, server down
            raise ConfigError(f"hydra.sweeper.storage={mask(str(self.storage))}: cannot open the study: "
                              f"{first_line(e)}") from e
        self._fail_stale(study, storage)
        before = len(study.get_trials(deepcopy=False))
        log.info("Optuna study %r in %s: %d trials so far; running %d (%d at a time), sampler %s, pruner %s",
                 study.study_name, mask(storage_url) if storage_url else "memory", before, self.n_trials,
                 self.n_jobs, type(study.sampler).__name__, type(study.pruner).__name__)
        if storage_url is None and "BasicLauncher" not in str(self.config.hydra.launcher.get("_target_", "")):
            log.warning("hydra.sweeper.storage=null: jobs in other processes cannot report to their trial")

        sweep = SweepContext.current() or SweepContext()
        self.sweep_id, self.parent_run_id = sweep.sweep_id, sweep.parent_run_id
        self.context = sweep.with_(study_name=study.study_name)
        allowed = math.floor(self.max_failure_rate * self.n_trials + 1e-9)
        failures: list[str] = []
        mine: list[int] = []  # trial numbers run by this invocation
        heartbeat = Heartbeat(storage, worker_id()).run()
        try:
            remaining = self.n_trials
            while remaining > 0:
                batch = min(remaining, self.n_jobs)
                trials: list[optuna.trial.Trial] = []
                self._fail_stale(study, storage)  # another worker's, on any host
                try:
                    for _ in range(batch):  # one by one: what a signal interrupts is told FAIL below
                        trials.append(study.ask())
                        heartbeat.start(trials[-1])
                    mine += [t.number for t in trials]
                    overrides: list[Sequence[str]] = []
                    for t in trials:
                        if not is_grid:
                            self._reseed(study, t.number)
                        overrides += self._configure_trials([t], space, fixed_params, fixed_overrides)
                    register_live(trials)
                    # job folders numbered by trial number: a continued study never reuses one
                    with trial_lines({t.number: trial_label(t.number, t.params) for t in trials}, self.launcher):
                        returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
                except BaseException as e:  # Ctrl-C, SIGTERM, a launcher error: no trial is left RUNNING in the storage
                    for t in trials:
                        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed as stale
                            t.set_user_attr(FAILURE_ATTR, f"the sweep stopped: {first_line(e)}")
                        study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
                        self._tag_state(study.study_name, t.number, TrialState.FAIL)  # nor in MLflow's tags
                    raise
                finally:
                    unregister_live(trials)
                    heartbeat.end(trials)
                for trial, ret in zip(trials, returns, strict=True):
                    state, value, why = self._tell(study, trial, ret, is_grid)
                    if state == TrialState.FAIL:
                        failures.append(f"trial {trial.number}: {why}")
                        log.warning("trial %d FAIL: %s", trial.number, why)
                    else:
                        log.info("trial %d %s%s", trial.number, state.name, "" if value is None else f": {value:.4f}")
                remaining -= batch
                if len(failures) > allowed:
                    raise TooManyFailedTrials(
                        f"{len(failures)} of {self.n_trials} trials failed, more than hydra.sweeper.max_failure_rate="
                        f"{self.max_failure_rate} allows ({allowed}); first: {failures[0]}")
        finally:
            heartbeat.close()
            self._fail_stale(study, storage)
            self._finish(study, mine, storage_url)

    def _fail_stale(self, study: optuna.Study, storage: Any) -> None:
        """Trials whose sweep process is gone (no heartbeat for the grace period; see
        :mod:`gradsweep.sweep.optuna_stale`) become FAIL, and their MLflow runs say so (the runs
        themselves are closed KILLED by the sweep callback). Never fatal: the study goes on (or ends
        with its own error), and the next check tries again."""
        try:
            failed = fail_stale(study, storage)
        except Exception as e:
            log.warning("could not check the study for trials left by dead sweeps: %s", first_line(e))
            return
        for number, why in failed:
            self._tag_state(study.study_name, number, TrialState.FAIL, this_sweep=False)
            log.warning("trial %d was left RUNNING: now FAIL (%s)", number, why)

    def _tag_state(self, study_name: str, number: int, state: TrialState, run_id: Optional[str] = None,
                   this_sweep: bool = True) -> None:
        """The trial's MLflow run says the state Optuna holds (``optuna.state``)."""
        run_id = run_id or self._child_run(study_name, number, this_sweep)
        if run_id:
            self._mlflow(lambda t: t.client.set_tag(run_id, TRIAL_STATE_TAG, state.name), f"tag run {run_id}")

    def _reseed(self, study: optuna.Study, number: int) -> None:
        """A seeded sampler draws trial ``number``'s values with a seed made of (``seed``, ``number``).

        The plugin seeds its sampler once per process, so a continued study replays the first
        invocation's random draws and two workers started with the same sweep draw the same values.
        Samplers read the history from the storage, so a fresh instance per trial loses nothing.
        """
        seed = (self.sampler_cfg or {}).get("seed")
        if seed is None or self.sampler_cfg is None:
            return
        mixed = int(numpy.random.SeedSequence([int(seed), number]).generate_state(1)[0])  # not seed + number:
        # consecutive seeds give similar first draws
        study.sampler = instantiate({**self.sampler_cfg, "seed": mixed},
                                    _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*"))

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: Any, is_grid: bool
              ) -> tuple[TrialState, Optional[float], str]:
        why = ""
        value: Optional[float] = None
        try:
            if ret.status == JobStatus.FAILED and isinstance(job_exception(ret), optuna.TrialPruned):
                raise job_exception(ret)  # not via .return_value, which prints "Error executing job"
            value = float(ret.return_value)
            state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
            if state == TrialState.FAIL:
                why, value = "objective is NaN: the run failed (diverged); see its failure tag in MLflow", None
        except optuna.TrialPruned as e:
            state, why = TrialState.PRUNED, str(e)
        except Exception as e:  # the job raised (bad drawn value, a bug): Hydra kept the exception
            state, why = TrialState.FAIL, f"{type(e).__name__}: {first_line(e)}"
        run_id = self._child_run(study.study_name, trial.number)
        attrs = {RUN_ID_ATTR: run_id, SWEEP_ATTR: self.sweep_id,
                 FAILURE_ATTR: why if state == TrialState.FAIL else None}
        for k, v in attrs.items():
            if v or (k == FAILURE_ATTR and k in trial.user_attrs):  # the mark of a live trial: cleared
                trial.set_user_attr(k, v)
        try:
            study.tell(trial, values=[value] if state == TrialState.COMPLETE and value is not None else None,
                       state=state)
        except RuntimeError as e:  # the plugin's grid workaround: GridSampler calls study.stop() when exhausted
            if not (is_grid and "Study.stop" in str(e)):
                raise
        if run_id:
            self._tag_state(study.study_name, trial.number, state, run_id)
        return state, value, why

    # ------------------------------------------------------------------------------ MLflow
    def _mlflow(self, action, what: str) -> Any:
        """Run ``action(tracker)``; MLflow trouble is logged, never fatal to the study."""
        try:
            if self.tracker is None:
                from gradsweep.sweep.hydra_adapter import tracking_spec

                assert self.config is not None  # set by setup()
                tracking = tracking_spec(self.config)
                if tracking.backend != "mlflow":  # a dry run records nothing
                    return None
                from gradsweep.track.tracker import Tracker

                self.tracker = Tracker(tracking.uri, tracking.experiment_name, tracking.artifact_location)
            return action(self.tracker)
        except Exception as e:
            log.warning("MLflow: could not %s: %s", what, first_line(e))
            return None

    def _child_run(self, study_name: str, number: int, this_sweep: bool = True) -> Optional[str]:
        """The MLflow run of trial ``number`` (tagged by the job), under this invocation's parent run
        (or any, for a trial a dead earlier invocation left)."""
        where = f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{TRIAL_NUMBER_TAG}` = '{number}'"
        if this_sweep and self.parent_run_id:
            where += f" and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"

        def find(t):
            runs = t.client.search_runs([t.experiment_id], filter_string=where, max_results=2)
            return runs[0].info.run_id if runs else None

        return self._mlflow(find, f"find the run of trial {number}")

    def _finish(self, study: optuna.Study, mine: list[int], storage_url: Optional[str]) -> None:
        """optimization_results.yaml (as the plugin writes it) and the MLflow parent run's summary."""
        assert self.config is not None  # set by setup()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = study.best_trial if complete else None
        results = {"name": "optuna", "study_name": study.study_name,
                   "best_params": best.params if best else None, "best_value": best.value if best else None,
                   "best_trial": best.number if best else None}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        if best:
            log.info("Best trial %d: value %.4f, %s", best.number, best.value, params_text(best.params))
        out = sweep_dir / "optuna"
        out.mkdir(exist_ok=True)
        table = write_trials_csv(trials, out / "trials.csv")
        figures = save_figures(study, out) if self.figures else []
        if not self.parent_run_id:
            log.warning("no MLflow parent run id for this sweep (store unreachable when it started, or no "
                        "GradsweepCallback): the study summary is only in %s", out)
            return
        counts = {s: sum(t.state == s for t in trials) for s in TrialState}
        metrics: dict[str, Any] = {"optuna/trials": len(trials), "optuna/complete": counts[TrialState.COMPLETE],
                   "optuna/pruned": counts[TrialState.PRUNED], "optuna/failed": counts[TrialState.FAIL],
                   "optuna/running": counts[TrialState.RUNNING], "optuna/trials_this_sweep": len(mine)}
        params = {"optuna.study_name": study.study_name,
                  "optuna.storage": mask(storage_url) if storage_url else "memory",
                  "optuna.sampler": type(study.sampler).__name__, "optuna.pruner": type(study.pruner).__name__,
                  "optuna.direction": study.direction.name.lower(), "optuna.n_trials": self.n_trials,
                  "optuna.n_jobs": self.n_jobs, "optuna.max_failure_rate": self.max_failure_rate}
        tags = {STUDY_TAG: study.study_name,
                "optuna.trial_numbers": f"{min(mine)}-{max(mine)}" if mine else "none"}
        if best:
            metrics["optuna/best_value"] = best.value
            metrics["optuna/best_trial"] = best.number
            params.update({f"best.{k}": v for k, v in best.params.items()})
            tags["optuna.best_trial"] = str(best.number)
            if best.user_attrs.get(RUN_ID_ATTR):
                tags["optuna.best_run_id"] = best.user_attrs[RUN_ID_ATTR]
        run_id = self.parent_run_id

        def log_summary(t):
            import time

            now = int(time.time() * 1000)
            t.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                               params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                               tags=[RunTag(k, v) for k, v in tags.items()])
            t.client.log_artifact(run_id, str(table), "optuna")
            for fig in figures:
                t.client.log_artifact(run_id, str(fig), "optuna")

        self._mlflow(log_summary, f"log the study summary to parent run {run_id}")


def write_trials_csv(trials: list[optuna.trial.FrozenTrial], path: Path) -> Path:
    """One row per trial of the study (all invocations): state, value, params, MLflow run id."""
    names = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "duration_s", "evaluations", "last_step", *names,
                    RUN_ID_ATTR, SWEEP_ATTR, FAILURE_ATTR, "datetime_start", "datetime_complete"])
        for t in trials:
            duration = t.duration.total_seconds() if t.duration is not None else ""
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value, duration,
                        len(t.intermediate_values), "" if t.last_step is None else t.last_step,
                        *(t.params.get(k, "") for k in names),
                        *(t.user_attrs.get(k, "") for k in (RUN_ID_ATTR, SWEEP_ATTR, FAILURE_ATTR)),
                        t.datetime_start or "", t.datetime_complete or ""])
    return path


def save_figures(study: optuna.Study, out: Path) -> list[Path]:
    """Optuna's figures as PNG (its matplotlib backend). A figure the study cannot have yet (e.g.
    importances before two trials completed) is skipped with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved: list[Path] = []
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        log.info("no completed trial yet: no Optuna figures")
        return saved
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "not enough trials for X" is our log line below
    mpl_log = logging.getLogger("matplotlib")
    mpl_level = mpl_log.level
    mpl_log.setLevel(logging.WARNING)  # not "Using categorical units ..." for choice() params
    for name in FIGURES:
        try:
            fig = optuna_figure(study, name)
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            saved.append(path)
        except Exception as e:
            log.info("Optuna figure %s skipped: %s", name, first_line(e))
        finally:
            plt.close("all")
    optuna.logging.set_verbosity(verbosity)
    mpl_log.setLevel(mpl_level)
    return saved


def optuna_figure(study: optuna.Study, name: str):
    """Optuna's matplotlib figure ``name`` (one of ``FIGURES``), at least 8 x 5 inches. Its
    intermediate values have one legend entry per trial, beside the axes: with 30 trials it was
    taller than the plot and squashed it; here the trials are coloured by objective and only the
    best few named (:func:`gradsweep.report.figures.by_objective`)."""
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = getattr(ovm, f"plot_{name}")(study)
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    fig = first.figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
    if name == "intermediate_values":
        from gradsweep.report.figures import LEGEND_MAX, by_objective

        trials = {f"Trial{t.number}": t for t in study.get_trials(deepcopy=False)}  # Optuna's line labels
        lines = {trial_label(t.number, t.params): [line] for line in first.get_lines()
                 if (t := trials.get(line.get_label())) is not None}
        if len(lines) > LEGEND_MAX:
            first.get_legend().remove()
            by_objective(first, lines, {trial_label(t.number, t.params): t.value for t in trials.values()
                                        if t.state == TrialState.COMPLETE and t.value is not None}, what="objective")
    return fig

