"""The ready studies (conf/experiment/*.yaml): every variant composes and validates, and a shortened
version of each study runs through the real pipeline into a real MLflow store. The full-length
studies (the numbers in docs/studies.md) are marked slow."""
from functools import cache
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import run_train, stored
from gradsweep.sweep.hydra_adapter import to_spec
from gradsweep.report.build import make_report, study_names
from gradsweep.train.diagnostics import VERDICTS
from jobs import compose_job, run_inprocess, study_variants

pytestmark = pytest.mark.unit

# study -> (number of variants, overrides that shorten it, train steps per epoch)
STUDIES = {
    "srn_explosion": (14, ["trainer.epochs=1"], 5),
    "mlp_vanishing": (3, ["trainer.epochs=5"], 1),
    "dead_relu": (2, ["trainer.epochs=5"], 1),
    "zero_init": (3, ["trainer.epochs=5"], 1),
    "circles_activations": (3, ["trainer.epochs=2"], 32),
    "moons_depth_lr": (6, ["trainer.epochs=5"], 1),
    "clip_value_vs_norm": (3, ["trainer.epochs=1"], 34),
}


@cache
def specs(study: str) -> list:
    """The validated config of every job of a study (composed once per test session)."""
    return [to_spec(compose_job(v)) for v in study_variants(study)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('studies') / 'mlruns' / 'mlflow.db'}"


def test_every_study_is_listed():
    # adaptive_clipping*: test_clipping.py; lm_spikes (examples/ on the path): test_examples.py
    # clip_rescue: a demo (below)
    assert study_names() == sorted([*STUDIES, "adaptive_clipping", "adaptive_clipping_mlp", "lm_spikes", "clip_rescue"])


def _rescue(seeds_threads, tmp_path) -> None:
    """experiment=clip_rescue: unclipped, every run diverges (FAILED, nonfinite); clipped, it learns."""
    variants = study_variants("clip_rescue")
    assert sorted(v[-1] for v in variants) == ["clip=none", "clip=norm"]
    for seed, threads in seeds_threads:
        for variant in variants:
            out = run_inprocess([*variant, f"trainer.seed={seed}", f"trainer.cpu_threads={threads}"],
                                tmp_path / f"{seed}-{threads}-{variant[-1]}", "memory")
            if variant[-1] == "clip=none":
                assert out.status == "FAILED" and out.failure.startswith("nonfinite"), (seed, threads, out.status)
            else:
                assert out.status == "FINISHED" and out.result.test_acc >= 0.9, (seed, threads, out.result)


def test_clip_rescue_diverges_unclipped_and_learns_clipped(tmp_path):
    _rescue([(0, 1), (1, 2)], tmp_path)


@pytest.mark.slow
def test_clip_rescue_over_seeds_and_threads(tmp_path):
    _rescue([(seed, threads) for seed in range(10) for threads in (1, 2)], tmp_path)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_variants_compose(study):
    jobs = specs(study)
    assert len(jobs) == STUDIES[study][0]
    assert len({repr(s) for s in jobs}) == len(jobs)  # every variant is a different job


def test_study_settings_state_the_original_setups():
    v = {s: specs(s) for s in STUDIES}
    srn = v["srn_explosion"]
    assert sorted({s.data.length for s in srn}) == [5, 10, 15, 20, 25, 30, 35]
    assert {(s.clip.name, s.clip.max_norm) for s in srn} == {("none", None), ("norm", 20.0)}
    assert {(s.optimizer.lr, s.trainer.batch_size, s.trainer.reduction, s.trainer.epochs) for s in srn} \
        == {(0.2, 64, "sum", 50)}
    mv = v["mlp_vanishing"][0]
    assert (mv.model.num_layers, mv.model.hidden_size, mv.model.weight_std, mv.model.bias_init) == (4, 3, 0.01, 1.0)
    assert (mv.optimizer.lr, mv.trainer.batch_size) == (0.01, 0)
    assert sorted(s.model.activation for s in v["mlp_vanishing"]) == ["leaky_relu", "relu", "sigmoid"]
    assert {s.model.bias_init for s in v["dead_relu"]} == {-8.0}
    zi = v["zero_init"][0]
    assert (zi.model.num_layers, zi.model.hidden_size, zi.model.weight_init, zi.model.bias_init, zi.optimizer.lr) == \
        (1, 5, "zeros", 0.0, 0.2)
    ca = v["circles_activations"][0]
    assert (ca.data.name, ca.data.n_samples, ca.data.factor, ca.data.noise, ca.data.split[0]) == \
        ("circles", 1400, 0.5, 0.1, 1000)  # trains on 1000 samples, as the original
    assert (ca.optimizer.name, ca.optimizer.lr, ca.optimizer.alpha, ca.trainer.loss, ca.trainer.batch_size,
            ca.trainer.epochs, ca.model.weight_std) == ("rmsprop", 1e-3, 0.9, "bce", 32, 100, 1.0)
    md = v["moons_depth_lr"]
    assert {(tuple(s.model.hidden_sizes), s.optimizer.lr) for s in md} == \
        {(h, lr) for h in ((5,), (5, 3)) for lr in (0.01, 1.0, 5.0)}
    assert {(s.trainer.epochs, s.trainer.batch_size, s.model.activation) for s in md} == {(3000, 0, "sigmoid")}
    cv = v["clip_value_vs_norm"]
    assert {(s.clip.name,
             s.clip.clip_value if s.clip.name == "value" else s.clip.max_norm if s.clip.name == "norm" else None)
            for s in cv} == {("none", None), ("value", 1.0), ("norm", 1.0)}
    assert {(s.model.name, s.data.name, s.optimizer.name, s.optimizer.lr) for s in cv} \
        == {("cnn", "digits", "adam", 1e-3)}


@pytest.mark.integration  # starts Python processes (train.py or the delivery process)
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_runs_shortened(study, store, tmp_path):
    n, shorten, steps_per_epoch = STUDIES[study]
    epochs = int(shorten[0].split("=")[1])
    client = MlflowClient(store)
    outcomes = [run_inprocess([*variant, *shorten], tmp_path / str(i), store) for i,
                variant in enumerate(study_variants(study))]
    assert len(outcomes) == n
    for out in outcomes:
        run = client.get_run(out.run_id)
        assert run.info.status == "FINISHED"
        tag = run.data.tags["grad_health"]
        assert tag == "ok" or set(tag.split(",")) <= set(VERDICTS)
        steps = [m.step for m in client.get_metric_history(out.run_id, "grad_norm/total")]
        assert steps == list(range(epochs * steps_per_epoch))
        assert run.data.metrics["health/peak_step"] in steps and 0 <= run.data.metrics["test/acc"] <= 1
    if study == "circles_activations":  # per-epoch statistics, checked against the saved weights
        out = outcomes[0]
        hist = client.get_metric_history(out.run_id, "weight_std/layers.0.weight")
        assert [m.step for m in sorted(hist, key=lambda m: m.step)] == [31, 63]
        last = torch.load(stored(store, out.run_id, "checkpoints/last.pt"), weights_only=True)
        last = last["model"]["layers.0.weight"]
        assert max(hist, key=lambda m: m.step).value == pytest.approx(last.std(unbiased=False).item(), rel=1e-5)
        assert len(client.get_metric_history(out.run_id, "grad_std/layers.3.bias")) == epochs
    if study == "zero_init":  # hidden units start identical and stay identical
        for out in outcomes:
            assert out.health.metrics["health/hidden_unit_spread"] < 1e-6


# ------------------------------------------------------------------------ full length (slow)
@pytest.mark.integration  # starts Python processes (train.py or the delivery process)
@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_full(study, tmp_path):
    """`python src/train.py -m experiment=<study>` as documented, then its report."""
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    res = run_train(["-m", f"experiment={study}", f"tracking.uri={store}"], tmp_path, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = make_report(study, store, str(tmp_path / "report"))
    rows = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == STUDIES[study][0] + 1 and all(",FINISHED," in r for r in rows[1:])
    assert Path(rep.files["grad_norm_total"]).is_file()


def test_preflight_validates_every_variant_of_a_preset(tmp_path):
    """A preset's own sweep values are checked before Hydra starts, like command-line sweeps."""
    import shutil

    from gradsweep.errors import ConfigError
    from gradsweep.sweep.hydra_adapter import preflight

    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parent.parent / "conf", conf)
    (conf / "experiment" / "bad.yaml").write_text(
        "# @package _global_\ndefaults:\n  - mlp_vanishing\nhydra:\n  sweeper:\n    params:\n"
        "      model.activation: relu,swish\n")
    assert preflight(str(conf), "config", ["-m", "experiment=mlp_vanishing"]) == 3
    assert preflight(str(conf), "config", ["-m", "experiment=srn_explosion", "clip=none"]) == 7  # the command line wins
    with pytest.raises(ConfigError, match="model.activation='swish' is invalid; allowed: sigmoid|tanh"):
        preflight(str(conf), "config", ["-m", "experiment=bad"])
    assert preflight(str(conf), "config", ["experiment=bad"]) == 1  # a single run does not sweep
