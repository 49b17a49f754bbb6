"""The plan line printed before PyTorch and MLflow load: from the command line alone."""
from gradsweep.cli.plan import plan


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
    assert "3 jobs of experiment=circles_activations's sweep" in plan(["-m", "experiment=circles_activations",
                                                                        "trainer.seed=0,1,2"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team:5000")
    assert "recorded in http://team:5000" in plan([])


def test_no_plan_for_help_or_an_unreadable_command_line():
    assert plan(["--help"]) is None and plan(["--cfg", "job"]) is None and plan(["-m", "a=[1,2"]) is None
