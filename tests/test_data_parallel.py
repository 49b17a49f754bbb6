"""trainer.devices=N: one job over N torch.distributed processes (gloo on this CPU machine). The
norms it records are those of the all-reduced gradients, equal to a one-process run's with the same
global batch; only rank 0 records; resume works."""

import numpy as np
from mlflow.tracking import MlflowClient

import gradsweep
from conftest import fresh_store, run_train
from jobs import run_inprocess

MOONS = ["model=mlp", "data=moons", "trainer.batch_size=50", "tracking.log_checkpoints=false"]


def assert_same_steps(one, two, names, rtol=1e-5) -> None:
    for name in names:
        a, b = np.asarray(one[name], dtype=float), np.asarray(two[name], dtype=float)
        assert len(a) == len(b) and len(a) > 0, name
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-7, err_msg=name)


def test_two_processes_record_one_processs_norms_with_reduction_sum(tmp_path):
    """reduction=sum (the default): each rank back-propagates its share's sum x 2, DDP averages:
    the global batch's gradient. A small lr keeps the run away from chaos, where any rounding grows."""
    common = [*MOONS, "trainer.epochs=3", "optimizer.lr=0.002"]
    one = run_inprocess(common, tmp_path / "one", "memory")
    two = run_inprocess([*common, "trainer.devices=2"], tmp_path / "two", "memory")
    assert one.status == two.status == "FINISHED"
    assert one.history.names == two.history.names
    names = [n for n in one.history.names if n != "clip/coef"]
    assert_same_steps({n: one.history.history[n][1] for n in names}, {n: two.history.history[n][1] for n in names}, names)


def test_a_sweep_over_devices_records_equal_histories_and_resumes(tmp_path, migrated_db):
    store = f"sqlite:///{fresh_store(tmp_path / 'mlruns', migrated_db)}"
    res = run_train(["-m", *MOONS, "trainer.reduction=mean", "trainer.epochs=4", "trainer.devices=1,2",
                     "tracking.log_checkpoints=true",
                     f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id],
                              filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(runs) == 2  # the ranks > 0 record nothing: no run of their own
    by = {r.data.params["trainer.devices"]: r for r in runs}
    assert {r.info.status for r in runs} == {"FINISHED"}
    one, two = (gradsweep.history(by[n].info.run_id, store) for n in ("1", "2"))
    assert list(one.columns) == list(two.columns) and list(one.index) == list(two.index)
    assert_same_steps(one, two, [c for c in one.columns if c != "clip/coef"])
    assert set(by["1"].data.metrics) == set(by["2"].data.metrics)

    # resume the 2-process run in place from its run id, longer: one continuous history
    run_id = by["2"].info.run_id
    res = run_train([*MOONS, "trainer.reduction=mean", "trainer.epochs=6", "trainer.devices=2",
                     f"trainer.resume_from={run_id}", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    longer = gradsweep.history(run_id, store)
    assert list(longer.index) == list(range(len(longer))) and len(longer) == len(two) * 6 // 4
    np.testing.assert_array_equal(longer["grad_norm/total"].to_numpy()[:len(two)], two["grad_norm/total"].to_numpy())
