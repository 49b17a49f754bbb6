"""``gradsweep.watch``: a plain PyTorch loop of the user's own, recorded like a job (real embedded
store, real delivery process)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import gradsweep
from gradsweep.errors import ConfigError, NonFiniteError
from gradsweep.names import CLIP_COEF, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, HEALTH_TAG, TRAIN_LOSS

pytestmark = pytest.mark.unit

STEPS = 60


def _loop(gs, model, opt, steps=STEPS, boom_at=None, accumulate=2):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 8, generator=gen), torch.randint(0, 3, (256,), generator=gen)
    for step in range(steps):
        for micro in range(accumulate):  # gradient accumulation: one record per optimizer step
            i = (step * accumulate + micro) * 16 % 256
            loss = nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            (loss / accumulate).backward()
        if step == boom_at:
            raise RuntimeError("the user's loop broke")
        gs.step(loss=loss, lr=opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


@pytest.mark.integration  # a real store and its delivery process
def test_a_plain_loop_is_recorded_like_a_job(store):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gradsweep.watch(model, clip={"name": "norm", "max_norm": 0.5}, tracking_uri=store, experiment_name="mine",
                         run_name="baseline", total_steps=STEPS, max_points=40) as gs:
        _loop(gs, model, opt)
        gs.log_metrics({"dev/acc": 0.5})
    client = MlflowClient(store)
    run = client.get_run(gs.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "baseline"
    assert run.data.tags[HEALTH_TAG] and run.data.params["clip.max_norm"] == "0.5"
    assert set(run.data.metrics) >= {TRAIN_LOSS, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, CLIP_COEF, "lr", "dev/acc",
                                     "grad_norm/0.weight", "grad_norm/4.bias", "health/peak_grad_norm"}
    frame = gradsweep.history(gs.run_id, tracking_uri=store)
    assert list(frame.index) == list(range(STEPS)) and list(frame.columns) == gs.names
    for name in gs.names:  # what the loop saw, step for step
        assert np.array_equal(frame[name].to_numpy(), gs.history.column(name), equal_nan=True), name
    assert (frame[GRAD_TOTAL_CLIPPED] <= 0.5 * (1 + 1e-4)).all() and (frame["lr"] == 0.5).all()
    assert len(client.get_metric_history(gs.run_id, GRAD_TOTAL)) <= 40  # bounded, as for a job
    assert {a.path for a in client.list_artifacts(gs.run_id, "figures")} == {"figures/grad_norms.png"}


@pytest.mark.integration  # a real store and its delivery process
def test_an_exception_inside_the_block_ends_the_run_failed_with_the_reason(store):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="the user's loop broke"):
        with gradsweep.watch(model, clip={"name": "zclip"}, tracking_uri=store, run_name="broken",
                             param_groups="module") as gs:
            _loop(gs, model, opt, boom_at=25)
    run = MlflowClient(store).get_run(gs.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure"] == "exception"
    assert run.data.tags["failure_reason"] == "RuntimeError: the user's loop broke"
    frame = gradsweep.history(gs.run_id, tracking_uri=store)
    assert list(frame.index) == list(range(25)) and "grad_norm/0.weight" in frame.columns  # dense: every tensor
    # MLflow: one curve per module (weight and bias together)
    assert {k for k in run.data.metrics if k.startswith("grad_norm/")} == \
        {"grad_norm/total", "grad_norm/total_clipped", "grad_norm/0", "grad_norm/2", "grad_norm/4"}
    last = frame.index[-1]
    assert run.data.metrics["grad_norm/2"] == pytest.approx(
        float(np.hypot(frame.loc[last, "grad_norm/2.weight"], frame.loc[last, "grad_norm/2.bias"])), rel=1e-5)


def test_a_diverging_loop_fails_at_its_step():
    model = _model()
    with pytest.raises(NonFiniteError):
        with gradsweep.watch(model, backend="memory") as gs:
            for step in range(5):
                model(torch.randn(4, 8)).sum().backward()
                gs.step(loss=float("nan") if step == 3 else 1.0)
    assert gs.status == "FAILED" and gs.run.tags["failure"] == "nonfinite_loss" and gs.run.tags["failure_step"] == "3"


@pytest.mark.parametrize("clip,message", [
    ({"name": "nope"}, "clip.name='nope' is invalid; allowed: adagc|agc|autoclip|none|norm|value|zclip"),
    ({"name": "norm", "max_norm": -1}, "clip.max_norm=-1 is invalid; allowed: a finite number > 0"),
    ({"name": "zclip", "alpah": 0.9}, "clip.alpah: not a key of clip=zclip; allowed: "),
])
def test_bad_clip_settings_are_one_line_naming_the_key(clip, message):
    with pytest.raises(ConfigError) as e:
        gradsweep.watch(_model(), clip=clip, backend="memory")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_misuse_is_a_clear_error_not_a_broken_run():
    model = _model()
    with gradsweep.watch(model, backend="memory") as gs:
        model(torch.randn(4, 8)).sum().backward()
        gs.step(loss=1.0)
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        gs.step(loss=1.0)  # after the block: the run is closed
    with pytest.raises(RuntimeError, match="a Watch records one run"):
        with gs:
            pass
    with pytest.raises(ConfigError, match="has no trainable parameters"):
        gradsweep.watch(nn.ReLU(), backend="memory")
    with pytest.raises(ValueError, match="reserved prefix"):
        with gradsweep.watch(_model(), backend="memory") as gs2:
            gs2.model(torch.randn(4, 8)).sum().backward()
            gs2.step(loss=1.0, **{"grad_norm/fake": 1.0})
    assert gs.run.status == "FINISHED" and gs2.status == "FAILED"
