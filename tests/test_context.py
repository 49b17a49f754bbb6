"""The sweep context survives Hydra's per-job channel unchanged, and carries no secret."""
from __future__ import annotations

import dataclasses

import pytest

from gradsweep.paths import CONF_DIR
from gradsweep.sweep.context import ENV, SweepContext
from gradsweep.sweep.hydra_adapter import compose_config

pytestmark = pytest.mark.unit

NASTY = ["plain", "quote \" and ' apostrophe", "back\\slash", "nächtlich ünïcode", "${oc.env:HOME}", "a,b=c d"]


@pytest.mark.parametrize("text", NASTY)
def test_job_override_round_trips_through_hydra(text, monkeypatch):
    ctx = SweepContext(parent_tags={"schedule": text}, sweep_id="s" * 32, parent_run_id="p" * 32,
                       constant_keys=("trainer.epochs", "tracking.uri"), study_name=text, trial_id=7)
    cfg = compose_config(CONF_DIR, [ctx.job_override()], hydra_config=True)
    value = cfg.hydra.job.env_set[ENV]  # what the launcher puts into the job's environment
    monkeypatch.setenv(ENV, value)
    assert SweepContext.current() == ctx


def test_installed_context_is_readable_json(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert SweepContext.current() is None
    ctx = SweepContext(parent_tags={"schedule": "nightly"})
    ctx.install()
    assert SweepContext.current() == ctx
    SweepContext.uninstall(None)
    assert SweepContext.current() is None


def test_context_has_no_place_for_a_storage_url():
    """The Optuna storage URL may hold a password; jobs read it from their own Hydra config, so the
    context (which Hydra's launchers print with every job's overrides) never carries it."""
    fields = {f.name for f in dataclasses.fields(SweepContext)}
    assert fields == {"parent_tags", "sweep_id", "parent_run_id", "parent_local_id", "constant_keys", "study_name",
                      "trial_id", "run_name"}


def test_run_names_say_only_what_the_run_varies():
    from gradsweep.run.job import run_name
    from gradsweep.sweep.hydra_adapter import constant_keys

    line = ["clip.max_norm=1,5,20", "trainer.epochs=2", "tracking.uri=sqlite:////tmp/x/m.db"]
    keys = constant_keys(line)
    assert keys == ("trainer.epochs", "tracking.uri")
    job = ["clip.max_norm=5", "trainer.epochs=2", "tracking.uri=sqlite:////tmp/x/m.db"]
    assert run_name(job, keys) == "clip.max_norm=5"
    assert run_name(["clip=norm", "tracking.uri=sqlite:////tmp/m.db"]) == "clip=norm"  # a single run
    assert run_name(["tracking.experiment_name=x"]) == "default"
