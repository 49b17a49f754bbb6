"""The job through the run-logger seam without a tracking store (``tracking.backend=memory``):
what one run records, checked in-process in a second or two."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradsweep import names
from gradsweep.track.logger import MemoryRunLogger
from jobs import run_inprocess

pytestmark = pytest.mark.unit

STEPS = 10  # default job: 300 training sequences, batch 64 -> 5 steps per epoch


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    return run_inprocess(["trainer.epochs=2", "trainer.eval_every_steps=5"], tmp_path_factory.mktemp("job"), "memory")


def test_memory_run_records_every_step_metric_param_tag_and_artifact(outcome):
    run = outcome.run
    assert isinstance(run, MemoryRunLogger) and run.status == "FINISHED" and outcome.status == "FINISHED"
    for key in (names.TRAIN_LOSS, names.TRAIN_ACC, names.GRAD_TOTAL, names.GRAD_TOTAL_CLIPPED, names.CLIP_COEF,
                "grad_norm/rnn.W", "grad_norm/rnn.U", "grad_norm/rnn.b", "grad_norm/classifier.weight"):
        assert [s for s, _ in run.metrics[key]] == list(range(STEPS)), key
    assert [s for s, _ in run.metrics[names.DEV_ACC]] == [4, 9]
    assert len(run.metrics[names.TEST_ACC]) == 1 and len(run.metrics[names.BEST_DEV_ACC]) == 1
    assert run.params["clip.max_norm"] == "20.0" and run.params["model.name"] == "srn"
    assert run.tags["clip"] == "norm" and run.tags[names.OVERRIDES_TAG] == "trainer.epochs=2 trainer.eval_every_steps=5"
    assert run.tags[names.HEALTH_TAG]
    assert {"config.yaml", "checkpoints/best.pt", "checkpoints/last.pt"} <= set(run.artifacts)
    assert yaml.safe_load(run.artifacts["config.yaml"])["clip"]["max_norm"] == 20.0


def test_clipped_norm_never_exceeds_threshold_and_coef_matches(outcome):
    run = outcome.run
    before = dict(run.metrics[names.GRAD_TOTAL])
    after = dict(run.metrics[names.GRAD_TOTAL_CLIPPED])
    coef = dict(run.metrics[names.CLIP_COEF])
    for step in before:
        assert after[step] <= 20.0 * (1 + 1e-4)
        assert math.isclose(after[step], before[step] * coef[step], rel_tol=1e-4)


@pytest.mark.integration  # starts Python processes (train.py or the delivery process)
def test_memory_backend_loads_no_mlflow(tmp_path):
    """A dry run never imports MLflow (nor opens a store): the backend is chosen by configuration."""
    code = ("import sys; sys.path.insert(0, 'tests'); from jobs import run_inprocess; "
            f"o = run_inprocess(['trainer.epochs=1'], __import__('pathlib').Path({str(tmp_path)!r}), 'memory'); "
            "print(o.status, any(m.split('.')[0] == 'mlflow' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split()[-2:] == ["FINISHED", "False"], out.stdout + out.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.integration  # starts Python processes (train.py or the delivery process)
def test_dry_run_sweep_with_train_py_records_nothing(tmp_path):
    """`tracking.backend=memory` through the real entry point, callback and sweep included: both
    jobs train and finish, and no store, spool or run appears."""
    from conftest import run_train

    res = run_train(["-m", "clip.max_norm=1,20", "trainer.epochs=1", "tracking.backend=memory"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert out.count("FINISHED: best dev acc") == 2 and "(in memory)" in out
    assert not (tmp_path / "mlruns").exists()
