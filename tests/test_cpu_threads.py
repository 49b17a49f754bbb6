"""trainer.cpu_threads: the job sets torch's CPU thread count (1 by default), 0 leaves torch's own."""
import torch
from mlflow.tracking import MlflowClient

from jobs import run_inprocess

import pytest

pytestmark = pytest.mark.integration


def test_job_sets_cpu_threads_and_logs_the_setting(tmp_path):
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = run_inprocess(["trainer.epochs=1"], tmp_path / "a", store)
        assert out.status == "FINISHED" and torch.get_num_threads() == 1  # the default
        torch.set_num_threads(2)
        out = run_inprocess(["trainer.epochs=1", "trainer.cpu_threads=0"], tmp_path / "b", store)
        assert out.status == "FINISHED" and torch.get_num_threads() == 2  # torch's own, untouched
    finally:
        torch.set_num_threads(before)
    assert MlflowClient(store).get_run(out.run_id).data.params["trainer.cpu_threads"] == "0"
