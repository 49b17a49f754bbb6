"""Gradient-health diagnostics: the pure function on known series, and the verdicts of real runs
(studies 1-3) as recorded in a real MLflow store."""
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from gradsweep.train.diagnostics import DiagnosticsConfig
from gradsweep.train.diagnostics import diagnose, layer_weights, spikes, vanished_steps
from gradsweep.train.telemetry import ParamStats
from jobs import run_inprocess

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One embedded store for the module (creating the MLflow schema costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('diag') / 'mlruns' / 'mlflow.db'}"


SRN_SHORT = ["trainer.epochs=20"]  # the default SRN job, 100 of its 250 steps: the spike is at step 12
MLP_VANISHING = ["experiment=mlp_vanishing", "trainer.epochs=20"]  # full batch: 20 steps
DEAD_RELU = ["experiment=dead_relu", "trainer.epochs=20"]


def hist(**series):
    return {k.replace("__", "/").replace("_dot_", "."): (list(range(len(v))), list(map(float, v)))
            for k, v in series.items()}


# --------------------------------------------------------------------------- pure function
def test_spikes_against_running_median():
    total = np.array([1, 2, 1, 2, 1, 2, 30, 2, 1, 19, 2, 100.0])
    # from step 5: step 6 (30 > 10 x 1.5), step 9 (19 > 10 x median(1,2,1,2,1,2,30,2,1) = 2 -> no), step 11 (100 > 20)
    assert spikes(total, 10.0, 50, 5).tolist() == [6, 11]
    assert spikes(total, 10.0, 3, 5).tolist() == [6, 11]  # window of 3 before step 9: (30, 2, 1) -> 2


def test_vanished_steps_needs_collapse_and_smallness():
    cfg = DiagnosticsConfig()
    norm = np.array([0.0, 100.0, 1e-3, 1e-3, 50.0, 1e-13])
    total = np.array([10.0, 100.0, 300.0, 1e-3, 60.0, 1.0])
    # step 0: exactly 0 -> vanished; step 2: < 1e-4 x 100 and < 1e-3 x 300; step 3: collapsed but it
    # is the whole total -> not vanished; step 5: below vanish_abs
    assert vanished_steps(norm, total, cfg).tolist() == [True, False, True, False, False, True]


def test_diagnose_synthetic_exploding_and_vanishing():
    n = 40
    total = [10.0] * n
    total[10] = 500.0
    u = [5.0] * 11 + [1e-5] * (n - 11)  # a recurrent matrix collapsing after the spike
    h = hist(grad_norm__total=total, train__loss=[1.0] * n, grad_norm__rnn_dot_U=u,
             grad_norm__rnn_dot_b=u, grad_norm__classifier_dot_weight=[9.0] * n)
    d = diagnose(h)
    assert d.verdicts == ["exploding", "vanishing"] and d.tag == "exploding,vanishing"
    assert d.metrics["health/peak_grad_norm"] == 500.0 and d.metrics["health/peak_step"] == 10
    assert d.metrics["health/spike_count"] == 1
    assert d.metrics["health/vanishing_frac/rnn.U"] == pytest.approx(29 / 40)
    assert d.metrics["health/vanishing_frac/classifier.weight"] == 0.0
    assert "rnn.U" in d.summary() and "rnn.b" not in d.summary()  # biases are measured, not decisive
    assert diagnose(h, DiagnosticsConfig(vanishing_frac=0.8)).tag == "exploding"
    assert diagnose(h, DiagnosticsConfig(spike_factor=100)).tag == "vanishing"


def test_diagnose_biases_alone_do_not_decide_and_ok_is_ok():
    n = 30
    h = hist(grad_norm__total=[1.0] * n, train__loss=[0.5] * n, grad_norm__layers_dot_0_dot_weight=[0.5] * n,
             grad_norm__layers_dot_0_dot_bias=[1.0] + [0.0] * (n - 1), grad_norm__layers_dot_1_dot_weight=[0.8] * n)
    d = diagnose(h)
    assert d.tag == "ok" and d.metrics["health/vanishing_frac/layers.0.bias"] == pytest.approx(29 / 30)
    assert d.metrics["health/first_last_ratio"] == pytest.approx(0.5 / 0.8)
    assert layer_weights(["convs.1.weight", "convs.0.weight", "classifier.weight"]) == \
        ["convs.0.weight", "convs.1.weight", "classifier.weight"]
    assert layer_weights(["rnn.W", "rnn.U", "classifier.weight"]) == []


def test_diagnose_nonfinite():
    h = hist(grad_norm__total=[1.0, 2.0, math.inf], train__loss=[1.0, 1.0, math.nan], grad_norm__w=[1.0, 1.0, math.nan])
    d = diagnose(h)
    assert "nonfinite" in d.verdicts and "step 2" in d.summary()


def test_param_stats_match_torch():
    torch.manual_seed(0)
    ts = [torch.randn(7, 3) * 5 + 2, torch.full((4,), 1.0), torch.randn(1)]
    got = ParamStats(ts)(ts)
    for i, t in enumerate(ts):
        assert got[0, i].item() == pytest.approx(t.mean().item(), rel=1e-5, abs=1e-6)
        assert got[1, i].item() == pytest.approx(t.std(unbiased=False).item(), rel=1e-4, abs=1e-6)
    assert got[1, 1].item() == 0.0  # a constant tensor: exactly 0 (two-pass), as for a bias of 1.0


# ------------------------------------------------------------------- real runs (studies 1-3)
def tag_of(store, outcome):
    return MlflowClient(store).get_run(outcome.run_id).data.tags["grad_health"]


def test_unclipped_srn_explodes_then_recurrent_gradients_vanish(tmp_path, store):
    """The default SRN job without clipping: one spike, then rnn.U/W collapse while the classifier
    keeps a large gradient; with clipping at 20 the recurrent gradients stay alive."""
    none = run_inprocess([*SRN_SHORT, "clip=none"], tmp_path / "none", store)
    m = none.health.metrics
    assert none.status == "FINISHED" and none.health.verdicts == ["exploding", "vanishing"]
    assert tag_of(store, none) == "exploding,vanishing"
    assert m["health/peak_grad_norm"] > 1000 and m["health/spike_count"] >= 1
    assert m["health/vanishing_frac/rnn.U"] > 0.7 and m["health/vanishing_frac/rnn.W"] > 0.7
    assert m["health/vanishing_frac/classifier.weight"] < 0.05
    steps, u = none.history.history["grad_norm/rnn.U"]
    assert max(u[-50:]) < 1.0 < max(u)  # collapsed after the spike
    assert min(none.history.history["grad_norm/classifier.weight"][1][-50:]) > 50
    # the metrics went to the store too, at the last step
    client = MlflowClient(store)
    logged = client.get_run(none.run_id).data.metrics
    assert logged["health/spike_count"] == m["health/spike_count"] and logged["health/peak_step"] == m["health/peak_step"]

    norm = run_inprocess([*SRN_SHORT, "clip=norm"], tmp_path / "norm", store)
    assert "vanishing" not in norm.health.verdicts and "vanishing" not in tag_of(store, norm)
    assert norm.health.metrics["health/vanishing_frac/rnn.U"] < 0.05
    assert norm.health.metrics["health/clipped_frac"] > 0.9
    alive = np.median(norm.history.history["grad_norm/rnn.U"][1][-50:])
    assert alive > 1.0 and alive > 100 * np.median(u[-50:])


@pytest.mark.parametrize("activation,verdict", [("sigmoid", "vanishing"), ("relu", "ok")])
def test_mlp_vanishing_verdicts(tmp_path, store, activation, verdict):
    out = run_inprocess([*MLP_VANISHING, f"model.activation={activation}"], tmp_path, store)
    assert out.status == "FINISHED"
    assert tag_of(store, out) == verdict
    ratio = out.health.metrics["health/first_last_ratio"]
    assert (ratio < 1e-7) if verdict == "vanishing" else (ratio > 1e-7)
    if activation == "relu":
        assert out.health.metrics["health/dead_relu_frac"] == 0.0


def test_dead_relu_verdict(tmp_path, store):
    out = run_inprocess([*DEAD_RELU, "model.activation=relu"], tmp_path, store)
    assert "dead_units" in tag_of(store, out).split(",")
    assert out.health.metrics["health/dead_relu_frac"] == 1.0
    # every hidden layer's gradient is exactly zero on every step
    for i in range(4):
        assert set(out.history.history[f"grad_norm/layers.{i}.weight"][1]) == {0.0}
