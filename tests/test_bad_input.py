"""Bad input: one-line error naming the key and the allowed values, exit 2, nothing created."""
import sys
from pathlib import Path

import pytest

from conftest import run_train
from gradsweep.cli.hydra_main import run_cli
from gradsweep.paths import CONF_DIR

pytestmark = pytest.mark.integration

CASES = [
    (["model=foo"], "model=foo: unknown option; allowed: cnn|custom|gru|lstm|mlp|srn"),
    (["optimizer.lr=-1"], "optimizer.lr=-1.0 is invalid; allowed: a finite number > 0"),
    (["clip.max_norm=0"], "clip.max_norm=0.0 is invalid; allowed: a finite number > 0"),
    (["clip.max_norm=-3"], "clip.max_norm=-3.0 is invalid"),
    (["clip.clip_value=-1"], "clip.clip_value=-1.0 is invalid"),  # ignored by clip=norm, still rejected
    (["model=mlp", "data=moons", "model.activation=swish"],
     "model.activation='swish' is invalid; allowed: sigmoid|tanh|relu|leaky_relu|elu"),
    (["data.path=/no/such/folder"], "data.path='/no/such/folder': folder not found"),
    (["-m", "clip.max_norm=1,0"], "clip.max_norm=0.0 is invalid"),
    (["-m", "optimizer.lr=0.1,-1"], "optimizer.lr=-1.0 is invalid"),
    (["optimizer.lr=abc"], "optimizer.lr: Value 'abc' of type 'str' could not be converted to Float"),
    (["model.bogus=1"], "model.bogus: Key 'bogus' not in 'SRNConfig'"),
    (["clip.norm_type=3"], "clip.norm_type=3.0 is invalid; allowed: 1.0|2.0|inf"),
    (["tracking.uri=not a uri"], "tracking.uri='not a uri' is not a tracking URI"),
    (["trainer.cpu_threads=-1"], "trainer.cpu_threads=-1 is invalid; allowed: an integer >= 0"),
    (["model=mlp"], "data='digit_sum' is invalid; allowed: moons|circles|digits for model=mlp"),
    (["tracking.backend=memory", "trainer.resume_from=0123456789abcdef0123456789abcdef"],
     "tracking.backend='memory' is invalid; allowed: mlflow to resume from the run id"),
    (["tracking.backend=sql"], "tracking.backend='sql' is invalid; allowed: mlflow|memory"),
    (["tracking.uri=file:///tmp/x"], "MLflow's file store is retired"),
    # resource bombs: refused from the config's estimate, before the data or the model is allocated
    (["data.train_copies=100000000"], "data (length=20, train_copies=100000000, dev_copies=1, test_copies=1): "
                                      "its data needs about 3.13e+03 GB, past the limit of"),
    (["model.hidden_size=100000000"], "model (num_layers=1, input_size=32, hidden_size=100000000): training it"),
    (["trainer.memory_limit_gb=0.0001"], "past the limit of 0.0001 GB; allowed: a smaller data config, or a larger "
                                         "trainer.memory_limit_gb (now 0.0001)"),
    (["optimizer.lr=1e308"], "optimizer.lr=1e+308 is invalid; allowed: a finite number > 0 that fits float32"),
    # Hydra creates the job's or sweep's folder once it starts: one it cannot is refused before
    (["hydra.run.dir=/proc/x"], "hydra.run.dir='/proc/x': /proc is not writable"),
    (["-m", "clip.max_norm=1,5", "hydra.sweep.dir=/proc/x/${now:%H}"],
     "hydra.sweep.dir='/proc/x/${now:%H}': /proc is not writable (No such file or directory); "
     "allowed: a folder this user can create and write"),
    ([f"tracking.experiment_name={'x' * 5000}"],
     "tracking.experiment_name='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (5000 characters)' is invalid; "
     "allowed: a printable name of 1-256 characters"),
]


def cli(args: list[str], tmp_path: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    """src/train.py's entry (run_cli) in this process: what a user sees, without a Python start-up
    per case (the subprocess cases below check the same wiring end to end)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: pytest.fail("bad input reached the job"), str(CONF_DIR), "config")
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input(tmp_path, capsys, monkeypatch, args, message):
    store_dir = tmp_path / "store"
    has_uri = any(a.startswith("tracking.uri=") for a in args)
    extra = [] if has_uri else [f"tracking.uri=sqlite:///{store_dir}/mlflow.db"]
    code, lines = cli([*args, *extra], tmp_path, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0]
    assert not store_dir.exists()  # no tracking store, so no run
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("args,message", [CASES[0], CASES[7]], ids=["single", "multirun"])
def test_bad_input_as_a_process(tmp_path, args, message):
    """The same through `python src/train.py` as a user runs it: stderr, exit status, no folders."""
    store_dir = tmp_path / "store"
    res = run_train([*args, f"tracking.uri=sqlite:///{store_dir}/mlflow.db"], tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert res.stdout == ""  # one line in all: no plan before the error
    assert not store_dir.exists()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_corrupt_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    res = run_train([f"trainer.resume_from={bad}", f"tracking.uri=sqlite:///{tmp_path}/s/mlflow.db"], tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "not a readable gradsweep checkpoint" in line and str(bad) in line
    assert not (tmp_path / "s").exists()


def test_help_lists_the_choices_not_the_schemas(tmp_path):
    res = run_train(["--help"], tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    groups = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in res.stdout.splitlines()
              if ": " in line and line.split(": ")[0] in ("clip", "model", "data", "optimizer", "tracking")}
    assert {"none", "norm", "value"} <= set(groups["clip"]), res.stdout
    assert set(groups["model"]) == {"cnn", "custom", "gru", "lstm", "mlp", "srn"}
    assert set(groups["tracking"]) == {"embedded", "server"}
    assert "_schema" not in res.stdout and "gradsweep (python src/train.py)" in res.stdout
