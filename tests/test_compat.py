"""One test per assumption gradsweep.compat makes about another library's private parts.

Each runs the installed library (no process started but one short Python for the exit path) and
names, when it fails, the compat function an upgrade broke: fix that function, nothing else.
"""
from __future__ import annotations

import ast
import inspect
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------ Hydra
def test_file_config_source_reads_a_folder_as_the_sweep_group(tmp_path):
    """compat.hydra.FileConfigSource: SweepsConfigSource inherits the YAML reading and the header."""
    from gradsweep.sweep.sources import SweepsConfigSource

    (tmp_path / "tiny.yaml").write_text("# @package _global_\nlr: 0.5\n")
    source = SweepsConfigSource(provider="test", path=f"gradsweep-sweeps://{tmp_path}")
    loaded = source.load_config("sweep/tiny")
    assert loaded.config.lr == 0.5 and loaded.header.get("package") == "_global_", \
        "gradsweep.compat.hydra.FileConfigSource: Hydra's file config source no longer reads a folder's YAML"
    assert source.list("sweep", None) == ["tiny"] and source.is_config("sweep/tiny")


def test_parse_command_line_gives_what_preflight_reads():
    from gradsweep.compat.hydra import parse_command_line

    args = parse_command_line(["-m", "--config-name", "other", "clip=norm", "clip.max_norm=1,5"])
    read = ("help", "hydra_help", "info", "cfg", "shell_completion", "config_path", "config_dir",
            "experimental_rerun", "config_name", "overrides", "multirun")
    assert all(hasattr(args, a) for a in read), \
        f"gradsweep.compat.hydra.parse_command_line: Hydra's parser lacks {[a for a in read if not hasattr(args, a)]}"
    assert (args.multirun, args.config_name, args.overrides, args.help) == \
        (True, "other", ["clip=norm", "clip.max_norm=1,5"], False), "gradsweep.compat.hydra.parse_command_line"
    assert parse_command_line(["--help"]).help, "gradsweep.compat.hydra.parse_command_line: --help"


def test_apply_value_overrides_sets_values_in_place():
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gradsweep.compat.hydra import apply_value_overrides

    assert list(inspect.signature(ConfigLoaderImpl._apply_overrides_to_config).parameters) == ["overrides", "cfg"], \
        "gradsweep.compat.hydra.apply_value_overrides: ConfigLoaderImpl._apply_overrides_to_config changed"
    cfg = OmegaConf.create({"clip": {"max_norm": 1.0}})
    apply_value_overrides(OverridesParser.create().parse_overrides(["clip.max_norm=5", "+extra=2"]), cfg)
    assert (cfg.clip.max_norm, cfg.extra) == (5, 2), "gradsweep.compat.hydra.apply_value_overrides"


def test_a_failed_jobs_exception_and_the_preamble_hydra_prints_before_it(capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from gradsweep.compat.hydra import is_job_error_preamble, job_exception

    error = ValueError("bad value")
    ret = JobReturn(overrides=["a=1"], status=JobStatus.FAILED, _return_value=error)
    assert job_exception(ret) is error, "gradsweep.compat.hydra.job_exception: JobReturn._return_value changed"
    assert capsys.readouterr().err == ""  # reading it printed nothing
    with pytest.raises(ValueError):
        ret.return_value  # noqa: B018 (the property prints, then raises)
    printed = capsys.readouterr().err
    assert is_job_error_preamble(printed), \
        f"gradsweep.compat.hydra.JOB_ERROR_PREAMBLE: Hydra now prints {printed!r} before a job's error"


@pytest.fixture
def hydra_app():
    from gradsweep.sweep.hydra_adapter import _hydra_at

    with _hydra_at(ROOT / "conf"):
        yield


def test_help_lists_config_groups_in_the_lines_the_cli_rewrites(hydra_app):
    from hydra.core.global_hydra import GlobalHydra

    from gradsweep.compat.hydra import format_help_group_line, help_group_line

    hydra = GlobalHydra.instance().hydra
    assert hydra is not None
    text = hydra.format_config_groups(lambda group: not group.startswith("hydra"))  # what --help shows
    parsed = {line: help_group_line(line) for line in text.splitlines()}
    assert parsed and all(parsed.values()), \
        f"gradsweep.compat.hydra.help_group_line: --help lists groups as {text!r}"
    assert all(format_help_group_line(*listed) == line for line, listed in parsed.items() if listed)
    groups = dict(v for v in parsed.values() if v)
    assert "srn" in groups["model"] and any(o.endswith("_schema") for o in groups["model"])


def test_an_unknown_group_option_names_the_group_and_its_options(hydra_app):
    """cli.hydra_main.one_line reads MissingConfigException's public missing_cfg_file and options."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    from gradsweep.cli.hydra_main import one_line

    with pytest.raises(MissingConfigException) as caught:
        compose("config", overrides=["model=nope"])
    assert caught.value.missing_cfg_file == "model/nope" and "srn" in (caught.value.options or ())
    line = one_line(caught.value)
    assert line.startswith("model=nope: unknown option; allowed: ") and "srn" in line and "_schema" not in line


def _announce_through_trial_lines(launcher, caplog) -> list[str]:
    from gradsweep.sweep.trial_lines import trial_lines

    with caplog.at_level(logging.INFO), trial_lines({7: "trial 7: lr=0.1"}, launcher):
        try:
            launcher.launch([["lr=0.1"]], initial_job_idx=7)
        except _Stop:
            pass
    return [r.getMessage() for r in caplog.records]


class _Stop(Exception):
    pass


def test_the_basic_launcher_announces_jobs_on_the_logger_trial_lines_filters(tmp_path, caplog, monkeypatch):
    """compat.hydra.launcher_loggers / job_announcement / is_batch_announcement, on Hydra's own launcher
    (stopped after its announcement: its configuration of logging and the job itself are not run)."""
    from hydra._internal.core_plugins import basic_launcher

    def stop(*_a, **_k):
        raise _Stop

    monkeypatch.setattr(basic_launcher, "configure_log", lambda *a, **k: None)
    launcher = basic_launcher.BasicLauncher()
    launcher.setup(hydra_context=SimpleNamespace(execution_whitelist=None,
                                                 config_loader=SimpleNamespace(load_sweep_config=stop)),
                   task_function=lambda cfg: 0,
                   config=OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False,
                                                      "sweep": {"dir": str(tmp_path)}}}))
    messages = _announce_through_trial_lines(launcher, caplog)
    assert messages == ["trial 7: lr=0.1"], \
        f"gradsweep.compat.hydra.launcher_loggers/job_announcement: the basic launcher logged {messages}"


def test_the_joblib_launcher_announces_jobs_on_the_logger_trial_lines_filters(tmp_path, caplog, monkeypatch):
    from hydra_plugins.hydra_joblib_launcher import _core
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

    from gradsweep.compat.hydra import JOBLIB_LAUNCHER_CORE

    monkeypatch.setattr(_core, "configure_log", lambda *a, **k: None)
    monkeypatch.setattr(_core, "Parallel", lambda **kw: (lambda jobs: []))  # no worker process: the line is enough
    launcher = JoblibLauncher(n_jobs=1)
    launcher.setup(hydra_context=SimpleNamespace(), task_function=lambda cfg: 0,
                   config=OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False,
                                                      "sweep": {"dir": str(tmp_path)}}}))
    messages = _announce_through_trial_lines(launcher, caplog)
    assert _core.log.name == JOBLIB_LAUNCHER_CORE
    # the joblib launcher numbers the jobs of a batch from 0, whatever initial_job_idx says
    assert any(m.startswith("\t#0 : lr=0.1") for m in messages), \
        f"gradsweep.compat.hydra.launcher_loggers/job_announcement: the joblib launcher logged {messages}"


# ----------------------------------------------------------------------------------- Optuna
def test_the_optuna_plugin_methods_the_sweep_loop_uses():
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl as Impl

    from gradsweep.compat.optuna import PLUGIN_METHODS

    missing = [m for m in PLUGIN_METHODS if not callable(getattr(Impl, m, None))]
    assert not missing, f"gradsweep.compat.optuna.PLUGIN_METHODS: the plugin's OptunaSweeperImpl lacks {missing}"
    params = {m: list(inspect.signature(getattr(Impl, m)).parameters) for m in PLUGIN_METHODS}
    assert params["_configure_trials"] == ["self", "trials", "search_space_distributions", "fixed_params",
                                           "fixed_overrides"], "gradsweep.compat.optuna: _configure_trials"
    assert params["_to_grid_sampler_choices"] == ["distribution"]
    assert list(inspect.signature(Impl.__init__).parameters) == [
        "self", "sampler", "direction", "storage", "study_name", "n_trials", "n_jobs", "max_failure_rate",
        "custom_search_space", "params"], "gradsweep.compat.optuna.OptunaSweeperImpl: __init__ changed"


def test_the_sweep_loop_calls_no_plugin_method_compat_does_not_list():
    """Every underscored method GradsweepOptunaSweeperImpl calls on itself is its own or in PLUGIN_METHODS."""
    from gradsweep.compat.optuna import PLUGIN_METHODS
    from gradsweep.sweep import optuna_loop

    tree = ast.parse(inspect.getsource(optuna_loop.GradsweepOptunaSweeperImpl))
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
              and not n.attr.startswith("__") and isinstance(n.value, (ast.Name, ast.Call))}
    own = set(vars(optuna_loop.GradsweepOptunaSweeperImpl))
    assert called - own <= set(PLUGIN_METHODS), sorted(called - own - set(PLUGIN_METHODS))


def test_params_from_overrides_parses_the_plugin_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from gradsweep.compat.optuna import params_from_overrides

    space, fixed, fixed_overrides = params_from_overrides(["lr=interval(0.001,0.1)", "depth=choice(2,4)",
                                                           "seed=3", "~clip"])
    assert isinstance(space["lr"], FloatDistribution) and isinstance(space["depth"], CategoricalDistribution), \
        "gradsweep.compat.optuna.params_from_overrides"
    assert fixed == {"seed": "3"} and fixed_overrides == ["~clip"], "gradsweep.compat.optuna.params_from_overrides"


def test_the_plugin_sweeper_delegates_to_the_impl_use_impl_replaces():
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

    for method in ("setup", "sweep"):
        assert "self.sweeper." in inspect.getsource(getattr(OptunaSweeper, method)), \
            f"gradsweep.compat.optuna.use_impl: OptunaSweeper.{method} no longer delegates to self.sweeper"


def test_trial_id_is_the_storage_id_of_a_trial_and_of_its_frozen_copy():
    import optuna

    from gradsweep.compat.optuna import trial_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="ids", storage=storage)
    study.ask()
    trial = study.ask()
    public = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("ids"), trial.number)
    frozen = study.get_trials(deepcopy=False)[1]
    assert trial_id(trial) == trial_id(frozen) == public, "gradsweep.compat.optuna.trial_id"
    assert optuna.trial.Trial(study, public).number == 1  # how a job in another process opens it


# ---------------------------------------------------------------------------------- submitit
def test_a_submitit_job_waits_for_its_result_as_long_as_the_attribute_says():
    from submitit.core.core import Job

    from gradsweep.compat.submitit import shorten_result_wait

    assert isinstance(Job._results_timeout_s, (int, float)) and "self._results_timeout_s" in inspect.getsource(Job), \
        "gradsweep.compat.submitit.shorten_result_wait: submitit's Job._results_timeout_s changed"
    job = SimpleNamespace(_results_timeout_s=Job._results_timeout_s)
    shorten_result_wait(job, 2)
    assert job._results_timeout_s == 2


# ----------------------------------------------------------------------------------- CPython
@pytest.mark.integration  # a fresh interpreter to exit
def test_exit_without_finalization_runs_thread_hooks_then_exit_handlers():
    """compat.cpython: threading's at-exit hooks (where loky and concurrent.futures stop their
    workers), then the atexit handlers, then the exit code; module finalization skipped."""
    code = ("import atexit, threading\n"
            "from gradsweep.compat.cpython import exit_without_finalization\n"
            "atexit.register(print, 'atexit handler')\n"
            "threading._register_atexit(print, 'threading hook')\n"
            "class Finalized:\n"
            "    def __del__(self): print('finalized')\n"
            "kept = Finalized()\n"
            "print('ran', flush=True)\n"
            "exit_without_finalization(5)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.split("\n")) == (5, ["ran", "threading hook", "atexit handler", ""]), \
        f"gradsweep.compat.cpython.exit_without_finalization: {out.returncode} {out.stdout!r} {out.stderr[-500:]}"
