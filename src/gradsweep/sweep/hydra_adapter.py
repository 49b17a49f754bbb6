"""The one place where Hydra and OmegaConf meet the job: schemas into Hydra's ConfigStore, a composed
config validated into a typed :class:`~gradsweep.run.spec.JobSpec`, the command line checked
before Hydra creates anything, and a Hydra job run as :func:`gradsweep.run.job.run_job`.

Validation is :func:`to_spec` and nothing else. It runs before launch for every job a command
line describes (:func:`preflight`: Hydra turns exceptions raised in callbacks into warnings, so
bad input must be stopped before Hydra starts) and once in each job, for the values a sweeper
drew after launch (Optuna ranges).
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradsweep.checks import choice
from gradsweep.compat.hydra import apply_value_overrides, parse_command_line
from gradsweep.errors import ConfigError, NonFiniteError, StopRun, first_line
from gradsweep.run.inputs import check_inputs
from gradsweep.run.job import JobContext, hold_folder, run_job
from gradsweep.run.ranks import Tasks, check_devices
from gradsweep.run.spec import JobSpec
from gradsweep.sweep.context import SweepContext
from gradsweep.sweep.job_tasks import job_tasks, launcher_tasks
from gradsweep.sweep.nodes import plain_dict, plain_dict_or_none
from gradsweep.sweep.overrides import job_combinations, output_folder
from gradsweep.train.diagnostics import DiagnosticsConfig
from gradsweep.train.loop import TrainerConfig
from gradsweep.train.registry import GROUPS, parts
from gradsweep.track.settings import TrackingConfig
from gradsweep.track.uri import check_writable, refuse_password

SINGLE_GROUPS = {"trainer": TrainerConfig, "tracking": TrackingConfig, "diagnostics": DiagnosticsConfig}


@dataclass
class GradsweepConfig:
    """The primary config's schema (``conf/config.yaml``)."""

    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    clip: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # a sweep file's {cron, timezone, trials_per_run}: read by `gradsweep schedule`, ignored by jobs
    schedule: Optional[Any] = None


# ------------------------------------------------------------------------------ schemas
@functools.cache  # once per process: every compose needs them, none needs them twice
def register_schemas() -> None:
    """Store the schemas so group YAMLs can name ``<option>_schema`` in their defaults list."""
    cs = ConfigStore.instance()
    # replace=True: registering again (a second compose in one process) is the same content, not a collision
    cs.store(name="gradsweep_schema", node=GradsweepConfig, replace=True)
    for group in GROUPS:
        for name, part in parts(group).items():
            node = OmegaConf.structured(part.schema)  # structured(class) does not run __post_init__
            node.name = name
            if part.open_keys:  # model=custom: every other key is the user's callable's keyword argument
                OmegaConf.set_struct(node, False)
            cs.store(group=group, name=f"{name}_schema", node=node, replace=True)
    for group, schema in SINGLE_GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema, replace=True)


def to_spec(cfg: DictConfig) -> JobSpec:
    """Validate a composed job config; ConfigError names the key and the allowed values."""
    values: dict[str, Any] = {}
    for group in GROUPS:
        options = parts(group)
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"{group} is missing; allowed: {'|'.join(options)}")
        choice(f"{group}.name", node.get("name"), tuple(options))
        part = options[node.name]
        values[group] = _to_dataclass(part.schema, _with_kwargs(part.schema, node) if part.open_keys else node, group)
    for group, schema in SINGLE_GROUPS.items():
        if cfg.get(group) is not None:
            values[group] = _to_dataclass(schema, cfg[group], group)
    return JobSpec(**values)


def _with_kwargs(schema: type[Any], node: DictConfig) -> DictConfig:
    """An open option's node with the keys its schema does not list moved under ``kwargs``."""
    known = set(schema.__dataclass_fields__) - {"kwargs"}
    plain = plain_dict(node)
    extra = {k: v for k, v in plain.items() if k not in known and k != "kwargs"}
    return OmegaConf.create({**{k: v for k, v in plain.items() if k in known},
                             "kwargs": {**(plain.get("kwargs") or {}), **extra}})


def tracking_spec(cfg: DictConfig) -> TrackingConfig:
    """Only the ``tracking`` group, for the sweep's parent run (the jobs validate the rest)."""
    return _to_dataclass(TrackingConfig, cfg.tracking, "tracking")


def _to_dataclass(schema: type[Any], node: DictConfig, group: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or group
        msg = first_line(e)
        fields = ", ".join(f for f in schema.__dataclass_fields__)
        where = f"{group}.{key.split('.')[-1] if key != group else ''}"
        raise ConfigError(f"{where}: {msg}; allowed keys: {fields}") from None


# ---------------------------------------------------------------------- the command line


def constant_keys(overrides: list[str]) -> tuple[str, ...]:
    """Keys of a multirun's command line that are not swept: every job gets the same value."""
    return tuple(ov.get_key_element().lstrip("+~") for ov in OverridesParser.create().parse_overrides(overrides)
                 if not ov.is_sweep_override())


@contextmanager
def _hydra_at(config_dir: str | Path) -> Iterator[None]:
    """Hydra's compose API, initialised on ``config_dir`` (outside a Hydra app)."""
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with initialize_config_dir(config_dir=str(config_dir), version_base=None):
                yield
    finally:
        GlobalHydra.instance().clear()


def compose_config(config_dir: str | Path, overrides: list[str], config_name: str = "config",
                   hydra_config: bool = False) -> DictConfig:
    """Compose one config with Hydra's compose API (outside a Hydra app: tests, preflight, reports)."""
    with _hydra_at(config_dir):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_config)


class SharedCompositions:
    """Composes the jobs of one command line, with their ``hydra`` node, inside :func:`_hydra_at`.

    Jobs that make the same config-group choices (``-m clip.max_norm=1,5,20``: all of them) share
    one composition of those choices; each job then gets its own values by Hydra's own last step of
    composing (:func:`gradsweep.compat.hydra.apply_value_overrides`, what ``compose`` runs after
    merging the defaults list). So preflight composes once where it composed once per job (a
    composition is the costly part of preflight; benchmarks/startup_speed.py times the sweep). An
    override is a value when it names no config group, no package, no deletion and nothing under
    ``hydra``; everything else is part of what is shared."""

    def __init__(self, config_name: str) -> None:
        self.config_name = config_name
        hydra = GlobalHydra.instance().hydra
        assert hydra is not None  # inside _hydra_at
        self.sources = hydra.config_loader.get_sources()
        self.parser = OverridesParser.create()
        self.shared: dict[tuple[str, ...], DictConfig] = {}

    def _is_value(self, override) -> bool:
        key = override.key_or_group
        return override.package is None and not override.is_delete() and key.split(".")[0] != "hydra" and \
            not any(source.is_group(key) for source in self.sources)  # what Hydra's group_exists asks

    def compose(self, overrides: list[str]) -> DictConfig:
        values: list[Any] = []
        groups: list[Any] = []
        for override in self.parser.parse_overrides(overrides):
            (values if self._is_value(override) else groups).append(override)
        choices = tuple(o.input_line for o in groups)
        if choices not in self.shared:
            self.shared[choices] = compose(config_name=self.config_name, overrides=list(choices),
                                           return_hydra_config=True)
        cfg = copy.deepcopy(self.shared[choices])
        apply_value_overrides(values, cfg)
        return cfg


def _jobs(config_dir: str | Path, overrides: list[str], config_name: str,
          multirun: bool) -> list[tuple[list[str], Optional[DictConfig]]]:
    """(overrides, its composed config (with ``-m``; else None)) per job."""
    if not multirun:
        return [(combo, None) for combo in job_combinations(overrides)]
    jobs: list[tuple[list[str], Optional[DictConfig]]] = []
    with _hydra_at(config_dir):
        compositions = SharedCompositions(config_name)
        for combo in job_combinations(overrides):
            cfg = compositions.compose(combo)
            refuse_password("hydra.sweeper.storage", cfg.hydra.sweeper.get("storage"))  # before multirun.yaml holds it
            params = cfg.hydra.sweeper.get("params") or {}
            given = {ov.get_key_element() for ov in compositions.parser.parse_overrides(combo)}
            for extra in job_combinations([f"{k}={v}" for k, v in params.items() if k not in given]):
                jobs.append((combo + extra, compositions.compose(combo + extra) if extra else cfg))
    return jobs


def expand_jobs(config_dir: str | Path, overrides: list[str], config_name: str = "config",
                multirun: bool = True) -> list[list[str]]:
    """The override lists of every job a command line launches: its discrete sweeps and, with
    ``-m``, the discrete ``hydra.sweeper.params`` a preset sets (the command line's keys win)."""
    return [job for job, _ in _jobs(config_dir, overrides, config_name, multirun)]


def preflight(config_dir: str, default_config_name: str, argv: list[str]) -> Optional[int]:
    """Compose and validate each job of a command line; raise on the first bad one.

    Returns the number of jobs checked, or None when the command is not a training run
    (``--help``, ``--cfg``, ``--info``, a custom config path)."""
    args = parse_command_line(argv)
    if args.help or args.hydra_help or args.info or args.cfg or args.shell_completion \
            or args.config_path or args.config_dir or args.experimental_rerun:
        return None
    name = args.config_name or default_config_name
    for override in args.overrides:  # any URI on the command line lands in .hydra/overrides.yaml
        key, _, value = override.partition("=")
        refuse_password(key.lstrip("+~"), value)
    folder_key = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    folder = output_folder(args.overrides, args.multirun)
    if folder is not None:  # Hydra creates it (a traceback where it cannot) once the job starts
        check_writable(folder_key, folder, Path(folder.split("${")[0] or ".").absolute(),
                       allowed="a folder this user can create and write")
    jobs = _jobs(config_dir, args.overrides, name, args.multirun)
    launcher = [o for o in args.overrides if o.lstrip("+~").startswith(("hydra/launcher", "hydra.launcher"))]
    tasks = 1
    if args.multirun and jobs and launcher:  # the jobs' configs leave hydra.* overrides out: composed once more
        composed = compose_config(config_dir, [*jobs[0][0], *launcher], name, hydra_config=True)
        tasks = launcher_tasks(composed.hydra.launcher)
    for job, cfg in jobs:
        spec = to_spec(cfg if cfg is not None else compose_config(config_dir, job, name))
        check_devices(spec.trainer.devices, tasks)  # the tasks of a job are its ranks
        check_inputs(spec, claim=not args.multirun)  # a sweep's resume is claimed by the process running its job
    if args.multirun and folder is not None and "${" not in folder:  # a folder given, not Hydra's time-stamped one:
        # given to two sweeps at once, the second is refused before it starts (else each of its jobs would be)
        hold_folder(Path(folder).absolute(), "hydra.sweep.dir")
    return len(jobs)


# ------------------------------------------------------------------------------ the job
def context_from_hydra(extra_tags: Optional[dict[str, str]] = None) -> JobContext:
    hc = HydraConfig.get()
    sweep = SweepContext.current() if hc.mode == RunMode.MULTIRUN else None
    return JobContext(
        overrides=list(hc.overrides.task),
        output_dir=Path(hc.runtime.output_dir),
        parent_run_id=sweep.parent_run_id if sweep else None,
        parent_local_id=sweep.parent_local_id if sweep else None,
        sweep_id=sweep.sweep_id if sweep else None,
        extra_tags=extra_tags or {},
        constant_keys=sweep.constant_keys if sweep else (),
        name=sweep.run_name if sweep else None,
    )


def _optuna_trial(sweep: Optional[SweepContext]):
    """The job's Optuna trial when gradsweep's Optuna sweeper launched it (Optuna imported only then).
    The study's storage and pruner come from the job's own Hydra config, not from the context."""
    if sweep is None or sweep.trial_id is None or sweep.study_name is None:
        return None
    from gradsweep.sweep.optuna_trial import job_trial

    sweeper = HydraConfig.get().sweeper
    pruner = sweeper.get("pruner")
    return job_trial(sweep.study_name, sweep.trial_id, sweeper.get("storage"),
                     plain_dict_or_none(pruner))


def job_from_hydra(cfg: DictConfig) -> float:
    """Single run: a diverged run is an error (exit 1). Sweep: it is a failed job returning NaN,
    so the sweep goes on (and Optuna records the trial as FAIL). A job run as several tasks of one
    scheduler step (:mod:`gradsweep.sweep.job_tasks`): rank 0 runs it, the others are its ranks."""
    spec = to_spec(cfg)
    tasks = job_tasks(Path(HydraConfig.get().runtime.output_dir))
    if tasks is None:
        return _job(spec, None)
    check_devices(spec.trainer.devices, tasks.world)
    if tasks.rank > 0:  # no run, no records: rank 0's result is the job's
        from gradsweep.run.rank import task_rank

        task_rank(spec, tasks)
        return math.nan
    with tasks.leading():  # however rank 0's job ends, its other ranks end with it
        return _job(spec, tasks)


def _job(spec: JobSpec, tasks: Optional[Tasks]) -> float:
    trial = _optuna_trial(SweepContext.current())
    ctx = context_from_hydra(trial.tags if trial else None)
    ctx.tasks = tasks
    outcome = run_job(spec, ctx, trial.on_eval if trial else None)
    if isinstance(outcome.error, StopRun):
        raise outcome.error  # pruned: the sweeper tells Optuna PRUNED
    if isinstance(outcome.error, NonFiniteError) and HydraConfig.get().mode != RunMode.MULTIRUN:
        raise outcome.error
    return outcome.objective if outcome.status == "FINISHED" else math.nan
