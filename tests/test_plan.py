"""The plan line printed before PyTorch and MLflow load: from the command line and the files it names."""
import io
import sys

from gradsweep.cli import plan as plan_module
from gradsweep.cli.plan import confirm_plan, plan, print_plan, withdraw_plan

import pytest

pytestmark = pytest.mark.unit


def test_plan_names_jobs_store_and_folder(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert plan(["-m", "clip.max_norm=1,5,20", "trainer.seed=0,1"]) == (
        "[gradsweep] 6 jobs, recorded in sqlite:///mlruns/mlflow.db, files under multirun/; "
        "loading PyTorch and MLflow...")
    assert plan([]) == ("[gradsweep] 1 job, recorded in sqlite:///mlruns/mlflow.db, files under outputs/; "
                        "loading PyTorch...")
    assert "recorded in http://127.0.0.1:5000" in plan(["tracking=server"])
    assert "recorded in http://bob:***@h:1" in plan(["tracking.uri=http://bob:pw@h:1"])  # never the password
    assert "recorded nowhere" in plan(["tracking.backend=memory"]) and "MLflow" not in plan(["tracking.backend=memory"])
    assert "the Optuna sweep clip_only" in plan(["-m", "+sweep=clip_only"])
    assert "9 jobs of experiment=circles_activations's sweep" in plan(["-m", "experiment=circles_activations",
                                                                        "trainer.seed=0,1,2"])
    # a preset's own sweep counts (its hydra.sweeper.params), less the keys the command line sets
    assert "3 jobs of experiment=mlp_vanishing's sweep" in plan(["-m", "experiment=mlp_vanishing"])
    assert "6 jobs of experiment=mlp_vanishing's sweep" in plan(["-m", "experiment=mlp_vanishing", "trainer.seed=0,1"])
    assert "1 job of experiment=mlp_vanishing's sweep" in plan(["-m", "experiment=mlp_vanishing",
                                                                "model.activation=relu"])
    assert "1 job," in plan(["experiment=mlp_vanishing"])  # without -m the preset's sweep does not run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert "recorded in http://team:5000" in plan([])
    # the folder given, where the files really go (each mode reads its own key)
    assert "files under /data/runs/a/;" in plan(["hydra.run.dir=/data/runs/a", "hydra.sweep.dir=/data/s"])
    assert "files under /data/s/;" in plan(["-m", "clip.max_norm=1,5", "hydra.run.dir=/data/runs/a",
                                            "hydra.sweep.dir=/data/s/"])
    assert "files under runs/${now:%H}/;" in plan(["hydra.run.dir=runs/${now:%H}"])


def test_no_plan_for_help_or_an_unreadable_command_line():
    assert plan(["--help"]) is None and plan(["--cfg", "job"]) is None and plan(["-m", "a=[1,2"]) is None


def test_no_plan_names_an_option_or_sweep_that_does_not_exist():
    """Never "the Optuna sweep nope (sweeps/nope.yaml)" before preflight says there is none."""
    for argv in (["-m", "+sweep=nope"], ["model=foo"], ["-m", "clip=none,nope"], ["-m", "experiment=nope"]):
        assert plan(argv) is None, argv
    assert plan(["model=mlp", "data=moons", "hydra/launcher=joblib"]) is not None  # Hydra's groups: not ours to check


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bad_input_leaves_only_its_error_line(monkeypatch):
    """On a terminal the plan shows at once and is erased when preflight rejects the command line;
    elsewhere it is held back until preflight accepts it (then printed without "loading ...")."""
    for columns, rows in (("200", 1), ("40", 3)):  # the 99-character line wraps on a narrow terminal
        monkeypatch.setenv("COLUMNS", columns)
        monkeypatch.setattr(sys, "stdout", Terminal())
        print_plan(["clip.max_norm=0"])
        withdraw_plan()
        out = sys.stdout.getvalue()
        assert out.startswith("[gradsweep] 1 job") and out.endswith(f"\n\x1b[{rows}F\x1b[J")  # up, clear
    for accepted in (False, True):
        monkeypatch.setattr(sys, "stdout", io.StringIO())  # a pipe
        print_plan(["trainer.epochs=1"])
        assert sys.stdout.getvalue() == ""
        confirm_plan() if accepted else withdraw_plan()
        out = sys.stdout.getvalue()
        assert out == ("[gradsweep] 1 job, recorded in sqlite:///mlruns/mlflow.db, files under outputs/\n"
                       if accepted else ""), out
    assert plan_module._held is None and plan_module._shown is None


def test_plan_counts_the_jobs_preflight_expands():
    from gradsweep.paths import CONF_DIR
    from gradsweep.sweep.hydra_adapter import expand_jobs

    for argv in (["experiment=srn_explosion"], ["experiment=mlp_vanishing", "trainer.seed=0,1"]):
        n = len(expand_jobs(CONF_DIR, argv))
        assert n > 2 and f" {n} jobs of " in plan(["-m", *argv]), (argv, n)
