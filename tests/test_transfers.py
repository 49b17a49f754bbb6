"""Device-resident telemetry: step vectors reach the host once per block (trainer.sync_every_steps),
never once per step, whatever the clipping rule; blocks change neither the records nor the exact
step a NaN/Inf is found at. Host syncs are counted at every point a tensor can reach the host."""
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsweep.train import transfer
from gradsweep.train.registry import parts
from jobs import run_inprocess

pytestmark = pytest.mark.unit

SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")  # each moves a value to the host


@pytest.fixture
def host_syncs(monkeypatch):
    """Counts every host sync in this process: Tensor methods that read a value, and the loop's
    block transfer (transfer.to_host)."""
    count = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            count["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    monkeypatch.setattr(transfer, "to_host", counted(transfer.to_host))
    return count


def syncs_of(host_syncs, tmp_path: Path, epochs: int, extra: list[str]) -> int:
    before = host_syncs["n"]
    out = run_inprocess([f"trainer.epochs={epochs}", "trainer.eval_every_steps=100000",
                         "tracking.log_checkpoints=false",
                         "diagnostics.enabled=false", *extra], tmp_path / f"e{epochs}", "memory")
    assert out.status == "FINISHED", out.error
    return host_syncs["n"] - before


@pytest.mark.parametrize("clip", sorted(n for n in parts("clip") if n != "value"))
def test_one_host_sync_per_block_whatever_the_clipping_rule(tmp_path, host_syncs, clip):
    """100 more steps (20 epochs of the default job's 5 steps) cost exactly 100/25 = 4 more syncs:
    one per block of sync_every_steps=25, none per step (the run's fixed syncs cancel out)."""
    extra = [f"clip={clip}", "trainer.sync_every_steps=25"]
    short, long = syncs_of(host_syncs, tmp_path / "a", 20, extra), syncs_of(host_syncs, tmp_path / "b", 40, extra)
    assert long - short == 4, (short, long)


def test_sync_every_step_when_asked(tmp_path, host_syncs):
    extra = ["trainer.sync_every_steps=1"]
    short, long = syncs_of(host_syncs, tmp_path / "a", 20, extra), syncs_of(host_syncs, tmp_path / "b", 40, extra)
    assert long - short == 100


def test_blocks_change_no_record(tmp_path):
    common = ["trainer.epochs=10", "tracking.log_checkpoints=false"]
    one = run_inprocess([*common, "trainer.sync_every_steps=1"], tmp_path / "one", "memory").history
    blocks = run_inprocess([*common, "trainer.sync_every_steps=7"], tmp_path / "blocks", "memory").history
    assert one.names == blocks.names
    for name in one.names:
        (s1, v1), (s2, v2) = one.history[name], blocks.history[name]
        assert np.array_equal(s1, s2) and np.array_equal(v1, v2, equal_nan=True), name
    assert one.sparse["dev/acc"] == blocks.sparse["dev/acc"]


@pytest.mark.parametrize("log_every", [1, 3])
def test_a_nonfinite_step_is_found_at_its_exact_step_in_any_block(tmp_path, log_every):
    diverge = ["model=mlp", "data=moons", "clip=none", "trainer.batch_size=0", "optimizer.lr=1000000.0",
               "trainer.epochs=40", "tracking.log_checkpoints=false", f"trainer.log_every_steps={log_every}"]
    outs = [run_inprocess([*diverge, f"trainer.sync_every_steps={n}"], tmp_path / str(n), "memory") for n in (1, 50)]
    assert [o.status for o in outs] == ["FAILED", "FAILED"]
    assert outs[0].failure == outs[1].failure and outs[0].error.step == outs[1].error.step
    for o in outs:  # the failing step is the last one recorded, whatever log_every_steps says
        steps, values = o.history.history["train/loss"]
        assert steps[-1] == o.error.step
        assert not np.isfinite(values[-1]) or not np.isfinite(o.history.history["grad_norm/total"][1][-1])
