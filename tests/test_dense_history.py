"""The dense per-step history and the bounded MLflow store (issue: telemetry that scales).

Every logged step is a fixed-size binary record in the run's journal; delivery writes them as
Parquet chunks (``telemetry/``) and sends MLflow only each window's minimum and maximum. Checked
against a real embedded store and a real ``mlflow server`` with proxied artifacts."""
from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import gradsweep
from gradsweep.names import GRAD_TOTAL, TRAIN_LOSS
from gradsweep.track.delivery import deliver
from gradsweep.track.journal import RunJournal
from gradsweep.track.steps import STEPS, StepSchema, read_records, sample, window
from gradsweep.track.tracker import Tracker
from jobs import run_inprocess

pytestmark = pytest.mark.unit


def _names(n_params: int) -> list[str]:
    return [TRAIN_LOSS, "train/acc", GRAD_TOTAL, "grad_norm/total_clipped", "clip/coef",
            *(f"grad_norm/layers.{i}.weight" for i in range(n_params))]


def _values(steps: int, n: int, seed: int, spike_at: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.lognormal(0.0, 0.3, size=(steps, n)).astype(np.float32)
    v[spike_at, 2] = 2600.0  # one spike of the total norm
    return v


def _journal(tmp_path, store: str, schema_kw: dict, run_name: str = "r") -> RunJournal:
    tracker = Tracker(store, "dense")
    run_id = tracker.start_run(run_name, {})
    header = {"uri": tracker.uri, "experiment_name": "dense", "artifact_location": None, "run_id": run_id, **schema_kw}
    return RunJournal.create(tmp_path / "spool", header)


def test_a_step_costs_4_bytes_a_value_plus_16_and_a_torn_tail_is_left_out(tmp_path, store):
    names = _names(100)
    journal = _journal(tmp_path, store, {})
    journal.define_steps(names, 1000)
    values = _values(1000, len(names), 0, 10)
    for step in range(1000):
        journal.log_steps(np.array([step]), values[step:step + 1])
    journal.close()
    size = (journal.folder / STEPS).stat().st_size
    assert size == 1000 * (16 + 4 * len(names))
    assert size / values.size < 5  # bytes per value
    with open(journal.folder / STEPS, "ab") as f:  # a crash in the middle of a record
        f.write(b"\x01\x02\x03")
    recs = read_records(journal.folder, StepSchema.load(journal.folder), 0)
    assert len(recs) == 1000 and np.array_equal(recs["v"], values) and list(recs["step"]) == list(range(1000))


@pytest.mark.parametrize("total,max_points,known", [(250, 2500, True), (10_000, 2500, True), (100_000, 2500, True),
                                                    (7_001, 50, True), (999, 10, True), (100_000, 2500, False),
                                                    (300, 2500, False), (50_000, 400, False)])
def test_sampling_keeps_every_window_min_and_max_within_the_budget(total, max_points, known):
    """``known``: the run's length is planned (a job); else (a loop of the user's own) windows widen
    as the run goes, within the same budget."""
    names = _names(3)
    schema = StepSchema(names, total if known else 0, max_points=max_points, max_param_points=max(2, max_points // 5))
    values = _values(total, len(names), total, spike_at=total // 3)
    recs = np.empty(total, dtype=[("step", "<i8"), ("ts", "<i8"), ("v", "<f4", (len(names),))])
    recs["step"], recs["ts"], recs["v"] = np.arange(total), 0, values
    points = []
    for family in ("head", "param"):
        pos = 0
        for cut in (total // 7, total // 2, total - 1):  # delivered in passes, as records arrive
            got, used = sample(recs[pos:cut], schema, False, family)
            points += got
            pos += used
        got, used = sample(recs[pos:], schema, True, family)
        points += got
        assert pos + used == total
    by_name: dict[str, dict[int, float]] = {}
    for name, step, _ts, value in points:
        assert step not in by_name.setdefault(name, {}), (name, step)  # no point sent twice
        by_name[name][step] = value
    for j, name in enumerate(names):
        budget = schema.max_param_points if name.startswith("grad_norm/layers") else max_points
        assert len(by_name[name]) <= budget, (name, len(by_name[name]))
        assert by_name[name][int(np.argmax(values[:, j]))] == float(values[:, j].max())  # the spike, exactly
        assert by_name[name][int(np.argmin(values[:, j]))] == float(values[:, j].min())
    if total <= max_points and known:  # a short run logs every step
        assert sorted(by_name[GRAD_TOTAL]) == list(range(total))
    if not known:  # its first steps at full resolution
        assert set(range(max(1, max_points // 40))) <= set(by_name[GRAD_TOTAL])
    assert window(total, max_points) == (1 if total <= max_points else math.ceil(total / (max_points // 2)))


@pytest.mark.integration  # a real store and its delivery process
def test_delivery_bounds_mlflow_and_history_returns_every_step(tmp_path, store):
    """6,000 steps of a 100-tensor model, chunked small: MLflow holds <= max_points per metric with
    the spike's exact value and step; gradsweep.history holds every step, bit for bit."""
    names = _names(100)
    journal = _journal(tmp_path, store, {"max_points": 200, "max_param_points": 40})
    journal.define_steps(names, 6000)
    values = _values(6000, len(names), 1, spike_at=4321)
    for start in range(0, 6000, 500):  # blocks, as a job syncing every 500 steps writes them
        journal.log_steps(np.arange(start, start + 500), values[start:start + 500])
        if start == 3000:
            journal.flush()  # a first pass delivers what is there while the run goes on
            assert not deliver(journal.folder)
    journal.end("FINISHED")
    assert deliver(journal.folder)
    client = MlflowClient(store)
    run = client.get_run(journal.run_id)
    assert run.info.status == "FINISHED"
    hist = sorted(client.get_metric_history(journal.run_id, GRAD_TOTAL), key=lambda m: m.step)
    assert len(hist) <= 200 and (4321, 2600.0) in [(m.step, m.value) for m in hist]
    assert len({m.step for m in hist}) == len(hist)  # none stored twice
    assert len(client.get_metric_history(journal.run_id, "grad_norm/layers.7.weight")) <= 40
    frame = gradsweep.history(journal.run_id, tracking_uri=store)
    assert list(frame.index) == list(range(6000)) and list(frame.columns) == names
    assert np.array_equal(frame.to_numpy(), values)
    assert not journal.folder.exists() or not (journal.folder / STEPS).exists()  # nothing left to deliver


@pytest.mark.integration  # a real store and its delivery process
def test_job_history_equals_what_the_loop_computed_embedded(tmp_path, store):
    out = run_inprocess(["trainer.epochs=6", "clip=none", "tracking.max_points=20", "tracking.max_param_points=10"],
                        tmp_path, store)
    _check_job(out, store, max_points=20, max_param_points=10)


@pytest.mark.integration  # starts a real mlflow server
def test_job_history_through_a_server_with_proxied_artifacts(tmp_path, mlflow_server):
    out = run_inprocess(["trainer.epochs=6", "tracking.max_points=20"], tmp_path, mlflow_server.uri)
    _check_job(out, mlflow_server.uri, max_points=20, max_param_points=250)
    files = [f.path for f in MlflowClient(mlflow_server.uri).list_artifacts(out.run_id, "telemetry")]
    assert files and all(f.endswith(".parquet") for f in files)
    assert not list((tmp_path / "mlruns" / "artifacts").glob("**/*.parquet"))  # on the server's side only


def _check_job(out, uri: str, max_points: int, max_param_points: int) -> None:
    assert out.status == "FINISHED"
    loop = out.history  # what the training loop computed, as it computed it
    frame = gradsweep.history(out.run_id, tracking_uri=uri)
    assert list(frame.index) == list(loop.steps) == list(range(30))
    for name in loop.names:
        assert np.array_equal(frame[name].to_numpy(), loop.column(name), equal_nan=True), name
    client = MlflowClient(uri)
    total = client.get_metric_history(out.run_id, GRAD_TOTAL)
    assert len(total) <= max_points
    peak = int(np.argmax(loop.column(GRAD_TOTAL)))
    assert (peak, float(loop.column(GRAD_TOTAL)[peak])) in [(m.step, m.value) for m in total]
    assert len(client.get_metric_history(out.run_id, "grad_norm/rnn.U")) <= max_param_points
    run = client.get_run(out.run_id)
    assert run.data.metrics["health/peak_grad_norm"] == pytest.approx(float(loop.column(GRAD_TOTAL).max()))


def test_a_run_end_waits_while_delivery_progresses_and_names_why_it_stops(tmp_path, store):
    """The end of a run waits tracking.delivery_timeout_s *without progress*: delivery merely behind
    moves the deadline; an unanswering store or a stuck delivery does not, and the reason says which."""
    import json
    import time

    from gradsweep.track.closing import Deadline

    journal = _journal(tmp_path, store, {})
    journal.define_steps(_names(1), 10)
    journal.flush()
    spool = journal.folder.parent
    deadline = Deadline(spool, timeout_s=1.5)
    t0 = time.monotonic()
    for offset in range(1, 4):  # progress every 0.8 s: still waiting after 2.4 s > 1.5 s
        time.sleep(0.8)
        (journal.folder / "state.json").write_text(json.dumps({"run_id": journal.run_id, "offset": offset}))
        assert not deadline.passed(), offset
    while not deadline.passed():  # then no progress: it passes 1.5 s later
        time.sleep(0.1)
    assert 3.0 < time.monotonic() - t0 < 6.0
    assert "made no progress for 1.5 s" in deadline.reason()
    (spool / ".outage").touch()
    assert "the tracking store did not answer" in deadline.reason()


@pytest.mark.parametrize("spec,expected", [
    ("tensor", ["blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.mlp.weight", "blocks.1.attn.weight",
                "head.weight"]),
    ("module", ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "head"]),
    ("depth:2", ["blocks.0", "blocks.1", "head.weight"]),
    (r"re:^blocks\.(\d+)", ["0", "1", "head.weight"]),
    ("re:^", ["blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.mlp.weight", "blocks.1.attn.weight",
              "head.weight"]),  # an empty match names no group: each tensor stays itself
])
def test_parameter_norms_are_grouped_for_mlflow_as_asked(spec, expected):
    """tracking.param_groups: each group's norm is the L2 norm of its tensors' gradients together."""
    params = ["blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.mlp.weight", "blocks.1.attn.weight",
              "head.weight"]
    names = [TRAIN_LOSS, GRAD_TOTAL, *(f"grad_norm/{p}" for p in params)]
    schema = StepSchema(names, 4, param_groups=spec)
    recs = np.empty(4, dtype=[("step", "<i8"), ("ts", "<i8"), ("v", "<f4", (len(names),))])
    recs["step"], recs["ts"] = np.arange(4), 0
    recs["v"] = np.arange(4 * len(names), dtype=np.float32).reshape(4, -1) + 1
    points, used = sample(recs, schema, True, "param")
    assert used == 4
    got = {}
    for name, step, _ts, value in points:
        got.setdefault(name, {})[step] = value
    assert list(got) == [f"grad_norm/{g}" for g in expected]
    v = recs["v"].astype(np.float64)
    for g in expected:  # recomputed from the per-tensor norms
        cols = [2 + i for i, p in enumerate(params) if p == g or (p.startswith(g + ".")
                                                                  and spec not in ("tensor", "re:^"))
                or (spec.startswith("re:^b") and p.startswith(f"blocks.{g}."))]
        want = np.sqrt((v[:, cols] ** 2).sum(axis=1))
        assert np.allclose([got[f"grad_norm/{g}"][s] for s in range(4)], want), g


def test_a_bad_param_groups_value_is_one_line():
    from gradsweep.errors import ConfigError
    from gradsweep.track.settings import TrackingConfig

    for bad, why in (("blocks", "unknown form"), ("depth:0", "depth:N needs an integer N >= 1"),
                     ("depth:\u00b2", "depth:N needs an integer N >= 1"), ("re:(", "re: ")):
        with pytest.raises(ConfigError) as e:
            TrackingConfig(param_groups=bad)
        assert str(e.value).startswith(f"tracking.param_groups={bad!r} is invalid; allowed: tensor|module|depth:N|re:")
        assert why in str(e.value)
