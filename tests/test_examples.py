"""examples/: a user's package used only as a user would (PYTHONPATH, model=custom/data=custom, and
gradsweep.watch in a plain loop), shortened."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

import gradsweep
from conftest import ROOT, run_train

pytestmark = pytest.mark.integration
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "examples"), os.environ.get("PYTHONPATH")) if p)}
SHORT = ["trainer.epochs=1", "data.train_chars=20000", "data.eval_chars=4000"]


def test_lm_spikes_runs_the_users_transformer_through_model_custom(tmp_path, store):
    res = run_train(["-m", "experiment=lm_spikes", "clip=none,zclip", "optimizer.lr=0.01", "trainer.seed=0", *SHORT,
                     f"tracking.uri={store}"], tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["clip.name"] for r in children) == ["none", "zclip"]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.params["model._target_"] == "gradsweep_examples.chargpt.CharGPT"
        assert {"dev/ppl", "test/ppl", "grad_norm/blocks.0.qkv.weight", "grad_norm/head.weight"} <= set(r.data.metrics)
        assert 1 < r.data.metrics["test/ppl"] < 98  # better than a uniform guess over the vocabulary


def test_the_same_example_in_a_plain_loop_through_watch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "train_with_watch.py"), "--train-chars", "8000",
                          "--tracking-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, **ENV})
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = res.stdout.split()[1]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["grad_health"]
    assert "grad_norm/blocks.0" in run.data.metrics  # param_groups=depth:2 in MLflow
    frame = gradsweep.history(run_id, tracking_uri=uri)
    assert "grad_norm/blocks.0.qkv.weight" in frame.columns and len(frame) == 8000 // 64 // 32 + 1
