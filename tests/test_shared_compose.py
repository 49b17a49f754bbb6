"""Preflight composes the jobs of a command line once per set of config-group choices and gives each
job its values by Hydra's own override step: the result must be what composing each job on its own
gives, and a bad value must fail the same way."""
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from gradsweep.sweep.hydra_adapter import SharedCompositions, _hydra_at, compose

pytestmark = pytest.mark.unit

JOBS = [["clip.max_norm=5"], ["clip.max_norm=5", "trainer.epochs=2"], ["clip=none", "optimizer.lr=0.1"],
        ["+trainer.extra=1"], ["experiment=mlp_vanishing", "trainer.seed=3"], ["experiment=mlp_vanishing"],
        ["model=mlp", "data=moons", "model.activation=relu"], ["tracking.uri=sqlite:///x.db", "clip=norm",
                                                              "clip.max_norm=3"],
        ["hydra.sweeper.params={}", "clip.max_norm=2"], ["~diagnostics"]]


def comparable(cfg):
    out = OmegaConf.to_container(cfg, resolve=False)
    out["hydra"].pop("overrides")  # the command line as given: shared jobs record only the shared part
    return out


def test_shared_composition_equals_composing_each_job():
    with _hydra_at(ROOT / "conf"):
        shared = SharedCompositions("config")
        for job in JOBS:
            alone = compose(config_name="config", overrides=job, return_hydra_config=True)
            together = shared.compose(job)
            assert comparable(together) == comparable(alone), job
            assert OmegaConf.is_struct(together)
        # one composition per set of group choices, not per job
        assert len(shared.shared) < len(JOBS)
        assert () in shared.shared and ("experiment=mlp_vanishing",) in shared.shared


@pytest.mark.parametrize("bad", [["model.no_such_key=1"], ["clip.max_norm=[1"], ["+clip.max_norm=1"]])
def test_a_bad_value_fails_as_composing_alone_does(bad):
    with _hydra_at(ROOT / "conf"):
        with pytest.raises(Exception) as alone:
            compose(config_name="config", overrides=bad, return_hydra_config=True)
        shared = SharedCompositions("config")
        shared.compose(["clip.max_norm=1"])  # the shared composition exists already
        with pytest.raises(Exception) as together:
            shared.compose(bad)
    assert type(together.value) is type(alone.value) and str(together.value) == str(alone.value)
