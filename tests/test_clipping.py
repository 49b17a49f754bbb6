"""The adaptive clipping rules (autoclip, agc, zclip, adagc): each against hand-computed values on small
tensors, their state through a checkpoint, their config checks, their per-step metrics through the
real job, and the study and sweep that compare them."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradsweep.errors import ConfigError
from gradsweep.names import CLIP_CLIPPED_FRAC, CLIP_COEF, CLIP_THRESHOLD, GRAD_TOTAL, GRAD_TOTAL_CLIPPED
from gradsweep.train.clipping import (AGC, AGCConfig, AdaGC, AdaGCConfig, AutoClip, AutoClipConfig, NormClip, ZClip,
                                      ZClipConfig, last_layer)
from gradsweep.train.telemetry import GradientNorms, metric_names, step_vector

pytestmark = pytest.mark.unit


class Toy(nn.Module):
    """Named parameters with given values: ``Toy(a=[...], head=dict(weight=..., bias=...))``."""

    def __init__(self, **tensors):
        super().__init__()
        for name, value in tensors.items():
            if isinstance(value, dict):
                sub = nn.Module()
                for k, v in value.items():
                    sub.register_parameter(k, nn.Parameter(torch.tensor(v, dtype=torch.float32)))
                self.add_module(name, sub)
            else:
                self.register_parameter(name, nn.Parameter(torch.tensor(value, dtype=torch.float32)))


def step(clipper, model, *grads):
    """Set the gradients, run the rule as the loop does; (coef, after, clipped grads, extra)."""
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float32).reshape(p.shape)
    norms = GradientNorms(model)
    gs = norms.grads()
    per_param = norms.per_param(gs)
    coef, after = clipper(norms, gs, norms.total(per_param), per_param=per_param)
    extra = clipper.extra()
    return float(coef), float(after), [p.grad.clone() for p in model.parameters()], \
        None if extra is None else extra.tolist()


def measured_total(model) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])))


# ----------------------------------------------------------------------------- autoclip
def test_autoclip_clips_to_the_percentile_of_the_history_so_far():
    model = Toy(w=[0.0, 0.0])
    clip = AutoClip(percentile=50, history=0)
    # norms 3, 4, 1, 10: medians of [3], [3,4], [3,4,1], [3,4,1,10] = 3, 3.5, 3, 3.5
    coef, after, (g,), extra = step(clip, model, [3.0, 0.0])
    assert extra == pytest.approx([3.0]) and coef == pytest.approx(1.0, abs=1e-6)
    coef, after, (g,), extra = step(clip, model, [0.0, 4.0])
    assert extra == pytest.approx([3.5]) and coef == pytest.approx(3.5 / 4) and after == pytest.approx(3.5)
    assert g.tolist() == pytest.approx([0.0, 3.5])
    coef, _, _, extra = step(clip, model, [1.0, 0.0])
    assert extra == pytest.approx([3.0]) and coef == 1.0  # below the threshold: untouched
    coef, after, (g,), extra = step(clip, model, [6.0, 8.0])
    assert extra == pytest.approx([3.5]) and after == pytest.approx(3.5) and g.tolist() == pytest.approx([2.1, 2.8])
    assert measured_total(model) == pytest.approx(after)


@pytest.mark.parametrize("history", [0, 5])
def test_autoclip_threshold_equals_numpy_percentile_of_the_window(history):
    rng = np.random.default_rng(0)
    model = Toy(w=[0.0])
    clip = AutoClip(percentile=10, history=history)
    seen = []
    for n in rng.lognormal(1.0, 1.0, size=40):
        seen.append(float(np.float32(n)))
        _, _, _, (thr,) = step(clip, model, [n])
        window = seen[-history:] if history else seen
        assert thr == pytest.approx(np.percentile(window, 10), rel=1e-6)


# ---------------------------------------------------------------------------------- agc
def test_agc_rescales_each_unit_relative_to_its_weights():
    # a.weight rows: norms 5 and 0 (eps 1e-3 floors it); a.bias one unit of norm 2; head left alone
    model = Toy(a=dict(weight=[[3.0, 4.0], [0.0, 0.0]], bias=[2.0, 0.0]), head=dict(weight=[[1.0, 0.0]]))
    clip = AGC(clip_factor=0.1, eps=1e-3)
    coef, after, (gw, gb, gh), (frac,) = step(clip, model, [[1.0, 0.0], [0.0, 1.0]], [0.1, 0.1], [[7.0, 7.0]])
    assert gw.flatten().tolist() == pytest.approx([0.5, 0.0, 0.0, 1e-4])  # 1 -> 0.1*5; 1 -> 0.1*1e-3
    assert gb.tolist() == pytest.approx([0.1, 0.1])  # ||g|| 0.14 <= 0.1*2: untouched
    assert gh.flatten().tolist() == pytest.approx([7.0, 7.0])  # the last layer is not clipped (the paper's choice)
    assert frac == pytest.approx(2 / 3)  # 2 of the 3 clipped-eligible units
    assert after == pytest.approx(measured_total(model), rel=1e-6)
    before = math.sqrt(2 + 0.02 + 98)
    assert coef == pytest.approx(after / before, rel=1e-6)


def test_agc_clips_the_srns_output_units_its_columns_as_the_paper_defines_them():
    """NFNets' unit-wise norm reduces over everything but a weight's output axis. The SRN stores W and
    U as (input, output) (h = tanh(x W + h U + b)), so its units are columns: checked against that
    definition computed by hand, with rows and columns of different norms so a row-wise rule fails."""
    from gradsweep.train.models import SRNConfig, SRN

    torch.manual_seed(0)
    model = SRN(SRNConfig(hidden_size=4, input_size=3, init="normal", init_std=0.5), num_classes=2)
    grads = [torch.randn_like(p) * 3 for p in model.parameters()]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, clipped, (frac,) = step(AGC(clip_factor=0.1, eps=1e-3), model, *[g.tolist() for g in grads])
    got = dict(zip([n for n, _ in model.named_parameters()], clipped, strict=True))
    raw = dict(zip([n for n, _ in model.named_parameters()], grads, strict=True))
    units = 0
    for name in ("rnn.W", "rnn.U"):
        g, w = raw[name], weights[name]
        for j in range(g.shape[1]):  # one output unit: column j
            limit = 0.1 * max(float(w[:, j].norm()), 1e-3)
            scale = min(1.0, limit / float(g[:, j].norm()))
            assert got[name][:, j].tolist() == pytest.approx((g[:, j] * scale).tolist(), rel=1e-5), (name, j)
            units += 1
    assert GradientNorms(model).output_dims[:4] == [0, 1, 1, 0]  # embedding rows, W and U columns, b one unit
    assert 0 < frac <= 1 and units == 8


def test_agc_can_clip_the_last_layer_too():
    model = Toy(a=dict(weight=[[1.0]]), head=dict(weight=[[1.0, 0.0]]))
    _, _, (_, gh), (frac,) = step(AGC(0.01, 1e-3, skip_last_layer=False), model, [[0.0]], [[0.0, 3.0]])
    assert gh.flatten().tolist() == pytest.approx([0.0, 0.01]) and frac == pytest.approx(0.5)


def test_last_layer_is_the_module_of_the_last_parameter():
    assert last_layer(["embedding.weight", "rnn.W", "rnn.U", "rnn.b", "classifier.weight", "classifier.bias"]) == \
        {"classifier.weight", "classifier.bias"}
    assert last_layer(["layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias"]) == \
        {"layers.3.weight", "layers.3.bias"}


# -------------------------------------------------------------------------------- zclip
def test_zclip_warms_up_then_clips_spikes_reciprocally():
    model = Toy(w=[0.0])
    clip = ZClip(alpha=0.5, z_threshold=2.0, warmup_steps=3, eps=1e-6)
    for n in (1.0, 2.0, 3.0):  # warm-up: untouched, no threshold (NaN: not logged)
        coef, after, _, (thr,) = step(clip, model, [n])
        assert coef == 1.0 and after == n and math.isnan(thr)
    mean, var = 2.0, 2 / 3  # of the warm-up's norms (population variance)
    std = math.sqrt(var)
    z = (10.0 - mean) / (std + 1e-6)
    target = mean + 2.0 ** 2 / z * std  # the paper's g* = mean + z_thres^2 / z * std
    coef, after, (g,), (thr,) = step(clip, model, [10.0])
    assert thr == pytest.approx(mean + 2.0 * (std + 1e-6))  # the spike threshold of the step
    assert after == pytest.approx(target, rel=1e-5) and g.tolist() == pytest.approx([target], rel=1e-5)
    mean2 = 0.5 * mean + 0.5 * target  # the statistics follow the clipped norm
    var2 = 0.5 * var + 0.5 * (target - mean2) ** 2
    coef, after, _, (thr,) = step(clip, model, [2.5])  # z = 0.57: no spike
    assert coef == 1.0 and thr == pytest.approx(mean2 + 2.0 * (math.sqrt(var2) + 1e-6), rel=1e-5)
    assert float(clip.mean) == pytest.approx(0.5 * mean2 + 0.5 * 2.5, rel=1e-5)


# -------------------------------------------------------------------------------- adagc
def test_adagc_global_warmup_then_per_tensor_ema():
    model = Toy(a=[0.0, 0.0], b=[0.0, 0.0])
    clip = AdaGC(beta=0.5, lambda_rel=1.5, lambda_abs=1.0, warmup_steps=2)
    # warm-up 1: global norm 5 -> 1 (x0.2); gamma = the clipped norms 0.6, 0.8
    coef, after, (ga, gb), (thr, frac) = step(clip, model, [3.0, 0.0], [0.0, 4.0])
    assert coef == pytest.approx(0.2) and after == pytest.approx(1.0) and (thr, frac) == (1.0, 1.0)
    assert ga.tolist() == pytest.approx([0.6, 0.0]) and gb.tolist() == pytest.approx([0.0, 0.8])
    # warm-up 2: norm 0.5, under lambda_abs; gamma_a = min(0.6, 0.5); b's zero gradient is no observation
    coef, _, _, (thr, frac) = step(clip, model, [0.5, 0.0], [0.0, 0.0])
    assert coef == 1.0 and frac == 0.0
    assert clip.gamma.tolist() == pytest.approx([0.5, 0.8])
    # per tensor: a (norm 2) clipped to 1.5 * 0.5 = 0.75; b (norm 1) under 1.5 * 0.8
    coef, after, (ga, gb), (thr, frac) = step(clip, model, [2.0, 0.0], [0.0, 1.0])
    assert ga.tolist() == pytest.approx([0.75, 0.0]) and gb.tolist() == pytest.approx([0.0, 1.0])
    assert math.isnan(thr) and frac == 0.5  # no global threshold after the warm-up
    assert after == pytest.approx(math.sqrt(0.75 ** 2 + 1.0)) and coef == pytest.approx(after / math.sqrt(5.0))
    assert clip.gamma.tolist() == pytest.approx([0.5 * 0.5 + 0.5 * 0.75, 0.5 * 0.8 + 0.5 * 1.0])


def test_adagc_tensor_without_gradient_in_warmup_starts_at_its_first_norm():
    """The SRN's recurrent matrix has a zero gradient at step 0 of a zero-initialised run: it must not
    be pinned at zero for the rest of training."""
    model = Toy(a=[0.0], u=[0.0])
    clip = AdaGC(beta=0.5, lambda_rel=1.05, lambda_abs=100.0, warmup_steps=1)
    step(clip, model, [1.0], [0.0])
    _, _, (_, gu), (_, frac) = step(clip, model, [1.0], [3.0])
    assert gu.tolist() == [3.0] and frac == 0.0  # no observation yet: unclipped
    assert clip.gamma.tolist() == pytest.approx([1.0, 3.0])
    _, _, (_, gu), _ = step(clip, model, [1.0], [30.0])
    assert gu.tolist() == pytest.approx([3.15])  # from now on clipped to 1.05 x its EMA


# ---------------------------------------------------------------------- state round-trip
RULES = {
    "autoclip": lambda: AutoClip(percentile=30, history=7),
    "autoclip_unbounded": lambda: AutoClip(percentile=10, history=0),
    "agc": lambda: AGC(0.05, 1e-3),
    "zclip": lambda: ZClip(alpha=0.9, z_threshold=1.5, warmup_steps=5),
    "adagc": lambda: AdaGC(beta=0.9, lambda_rel=1.05, lambda_abs=3.0, warmup_steps=5),
}


@pytest.mark.parametrize("rule,cut", [(r, c) for r in sorted(RULES) for c in (3, 12)] + [("autoclip_unbounded", 290)])
def test_state_round_trips_through_a_checkpoint(rule, cut, tmp_path):
    """N steps, save, restore into a fresh rule, continue: the same decisions as without the break
    (cuts in the warm-ups, after them, in a wrapped history, past the unbounded history's first 256)."""
    steps = 300 if rule == "autoclip_unbounded" else 20
    rng = np.random.default_rng(1)
    grads = [(rng.lognormal(0, 1.5, 3).tolist(), rng.lognormal(0, 1.5, 2).tolist()) for _ in range(steps)]

    def run(clip, seq):
        model = Toy(a=dict(weight=[[0.5, 1.0, 2.0]]), head=dict(bias=[1.0, 1.0]))
        return [step(clip, model, [ga], gb) for ga, gb in seq]

    whole = run(RULES[rule](), grads)
    first = RULES[rule]()
    head = run(first, grads[:cut])
    path = tmp_path / "last.pt"
    torch.save({"clip": first.state_dict()}, path)
    fresh = RULES[rule]()
    fresh.load_state_dict(torch.load(path, weights_only=True)["clip"])
    tail = run(fresh, grads[cut:])
    for a, b in zip(whole, head + tail, strict=True):
        assert a[0] == b[0] and a[1] == b[1]  # coef, norm after: exactly
        assert np.array_equal(np.array(a[3]), np.array(b[3]), equal_nan=True)  # threshold / fraction


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_step_never_reads_a_value_on_the_host(rule, monkeypatch):
    """The hot path keeps everything on the device: any read of a tensor's value by Python (.item(),
    .tolist(), float(), bool() in an ``if``) would be a host sync per step on a GPU."""
    model = Toy(a=dict(weight=[[0.5, 1.0, 2.0]]), head=dict(bias=[1.0, 1.0]))
    clip = RULES[rule]()
    norms = GradientNorms(model)
    for i in range(12):  # through the warm-ups
        for p in model.parameters():
            p.grad = torch.full_like(p, float(i % 5 + 1))
        gs = norms.grads()
        per_param = norms.per_param(gs)
        total = norms.total(per_param)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
                m.setattr(torch.Tensor, name, lambda *a, _n=name, **k: pytest.fail(f"{rule} called Tensor.{_n}"))
            clip(norms, gs, total, per_param=per_param)
            clip.extra()


def test_state_of_another_rule_is_refused():
    with pytest.raises(ValueError, match="zclip"):
        AdaGC().load_state_dict(ZClip().state_dict())


# ----------------------------------------------------------------------------- the loop
def test_step_vector_carries_the_rules_metrics_after_the_clip_factor():
    names = metric_names(["w"], (CLIP_THRESHOLD, CLIP_CLIPPED_FRAC))
    assert names == ["train/loss", "train/acc", GRAD_TOTAL, GRAD_TOTAL_CLIPPED, CLIP_COEF, CLIP_THRESHOLD,
                     CLIP_CLIPPED_FRAC, "grad_norm/w"]
    one = torch.ones(())
    vec = step_vector(one, one, one, one, one, torch.tensor([7.0]), torch.tensor([2.0, 0.5]))
    assert vec.tolist() == [1, 1, 1, 1, 1, 2.0, 0.5, 7.0]
    assert metric_names(["w"]) == names[:5] + names[7:]  # the stateless rules: unchanged


@pytest.fixture(scope="module")
def srn_runs(tmp_path_factory):
    """The real job (in-process, memory backend) with each rule: 2 epochs = 10 steps; short warm-ups."""
    from jobs import run_inprocess

    tmp = tmp_path_factory.mktemp("clip_runs")
    common = ["trainer.epochs=2", "trainer.eval_every_steps=5"]
    extra = {"zclip": ["clip.warmup_steps=3"], "adagc": ["clip.warmup_steps=3"], "autoclip": [], "agc": []}
    return {rule: run_inprocess([f"clip={rule}", *common, *ov], tmp / rule, "memory")
            for rule, ov in extra.items()}, tmp


def _series(outcome, key):
    steps, values = outcome.history.history.get(key, ([], []))
    return list(steps), [float(v) for v in values]


def test_job_logs_what_each_rule_decided_every_step(srn_runs):
    runs, _ = srn_runs
    for rule, out in runs.items():
        assert out.status == "FINISHED", rule
        steps, coef = _series(out, CLIP_COEF)
        assert steps == list(range(10)) and all(0 < c <= 1 for c in coef)
        _, before = _series(out, GRAD_TOTAL)
        _, after = _series(out, GRAD_TOTAL_CLIPPED)
        for b, a, c in zip(before, after, coef, strict=True):
            assert a == pytest.approx(b * c, rel=1e-4) and a <= b * (1 + 1e-6)
    assert _series(runs["autoclip"], CLIP_THRESHOLD)[0] == list(range(10))
    assert _series(runs["zclip"], CLIP_THRESHOLD)[0] == list(range(3, 10))  # none during the warm-up
    assert _series(runs["adagc"], CLIP_THRESHOLD)[0] == [0, 1, 2]  # lambda_abs, during the warm-up only
    assert _series(runs["adagc"], CLIP_CLIPPED_FRAC)[0] == list(range(10))
    steps, frac = _series(runs["agc"], CLIP_CLIPPED_FRAC)
    assert steps == list(range(10)) and all(0 <= f <= 1 for f in frac)
    for rule in ("autoclip", "zclip"):
        assert CLIP_CLIPPED_FRAC not in runs[rule].history.history
    thr = dict(zip(*_series(runs["autoclip"], CLIP_THRESHOLD), strict=True))
    for s, _b, a in zip(range(10), _series(runs["autoclip"], GRAD_TOTAL)[1],
                        _series(runs["autoclip"], GRAD_TOTAL_CLIPPED)[1], strict=True):
        assert a <= thr[s] * (1 + 1e-5)  # never above the threshold it reported


@pytest.mark.parametrize("rule", ["autoclip", "zclip", "adagc"])
def test_resumed_job_continues_the_rules_history(srn_runs, rule):
    """Resume from the step-5 checkpoint of the 10-step run: the same thresholds as without the break."""
    from jobs import run_inprocess

    runs, tmp = srn_runs
    half = run_inprocess([f"clip={rule}", "trainer.epochs=1", "trainer.eval_every_steps=5",
                          *(["clip.warmup_steps=3"] if rule != "autoclip" else [])], tmp / f"{rule}_half", "memory")
    ckpt = tmp / f"{rule}_half" / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 5 and state["clip"]["rule"] == rule and state["clip"]["t"] == 5
    resumed = run_inprocess([f"clip={rule}", "trainer.epochs=2", "trainer.eval_every_steps=5",
                             f"trainer.resume_from={ckpt}",
                             *(["clip.warmup_steps=3"] if rule != "autoclip" else [])],
                            tmp / f"{rule}_resumed", "memory")
    assert half.status == resumed.status == "FINISHED"
    key = CLIP_THRESHOLD if rule != "adagc" else CLIP_CLIPPED_FRAC
    full = dict(zip(*_series(runs[rule], key), strict=True))
    cont = dict(zip(*_series(resumed, key), strict=True))
    assert sorted(cont) == list(range(5, 10))
    for s in cont:
        assert cont[s] == pytest.approx(full[s], rel=1e-6), (rule, s)
    for s, v in zip(*_series(resumed, CLIP_COEF), strict=True):
        assert v == pytest.approx(dict(zip(*_series(runs[rule], CLIP_COEF), strict=True))[s], rel=1e-6)


def test_checkpoint_without_clipper_state_still_loads(srn_runs, caplog):
    """Checkpoints written before rules had state: a stateless rule resumes as before; a stateful one
    starts its statistics afresh and says so."""
    from jobs import compose_job
    from gradsweep.sweep.hydra_adapter import to_spec
    from gradsweep.train.loop import Trainer
    from gradsweep.train.registry import build
    from gradsweep.train.sinks import HistorySink

    _, tmp = srn_runs
    state = torch.load(tmp / "zclip" / "checkpoints" / "last.pt", weights_only=True)
    old = {k: v for k, v in state.items() if k != "clip"}
    spec = to_spec(compose_job(["clip=zclip"]))
    data = build("data", spec.data)
    model = build("model", spec.model, data, data.num_classes)

    def trainer(clipper):
        return Trainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1), clipper, spec.trainer, HistorySink(),
                       torch.device("cpu"))

    t = trainer(NormClip(3.0))
    t.restore(old)  # a stateless rule: nothing to restore, nothing to say
    assert t.step == 10 and t.state()["clip"] == {}
    z = ZClip()
    with caplog.at_level("WARNING", logger="gradsweep"):
        trainer(z).restore(old)
    assert z.t == 0 and "holds no state of clip=zclip" in caplog.text
    trainer(z).restore(state)
    assert z.t == 10 and z.mean is not None


# ---------------------------------------------------------------------------- the config
@pytest.mark.parametrize("schema,key,value,allowed", [
    (AutoClipConfig, "percentile", 0.0, "a number in (0, 100]"),
    (AutoClipConfig, "percentile", 101.0, "a number in (0, 100]"),
    (AutoClipConfig, "history", -1, "an integer >= 0 (0 = every step's norm)"),
    (AGCConfig, "clip_factor", 0.0, "a finite number > 0"),
    (AGCConfig, "eps", math.inf, "a finite number > 0"),
    (ZClipConfig, "alpha", 1.0, "a number in (0, 1)"),
    (ZClipConfig, "z_threshold", -2.5, "a finite number > 0"),
    (ZClipConfig, "warmup_steps", 0, "an integer >= 1"),
    (AdaGCConfig, "beta", 1.0, "a number in [0, 1)"),
    (AdaGCConfig, "lambda_rel", 0.0, "a finite number > 0"),
    (AdaGCConfig, "lambda_abs", math.nan, "a finite number > 0"),
    (AdaGCConfig, "warmup_steps", -1, "an integer >= 0"),
])
def test_invalid_values_name_the_key_and_the_allowed_values(schema, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        schema(**{key: value})
    assert str(e.value) == f"clip.{key}={value!r} is invalid; allowed: {allowed}"


def test_invalid_values_stop_at_compose():
    from jobs import compose_job
    from gradsweep.sweep.hydra_adapter import to_spec

    with pytest.raises(ConfigError, match=r"^clip.alpha=1.5 is invalid; allowed: a number in \(0, 1\)$"):
        to_spec(compose_job(["clip=zclip", "clip.alpha=1.5"]))
    spec = to_spec(compose_job(["clip=autoclip"]))
    assert (spec.clip.name, spec.clip.percentile, spec.clip.history) == ("autoclip", 10.0, 10000)
    defaults = {r: to_spec(compose_job([f"clip={r}"])).clip for r in ("agc", "zclip", "adagc")}
    assert (defaults["agc"].clip_factor, defaults["agc"].eps, defaults["agc"].skip_last_layer) == (0.01, 1e-3, True)
    assert (defaults["zclip"].alpha, defaults["zclip"].z_threshold, defaults["zclip"].warmup_steps) == (0.97, 2.5, 25)
    assert (defaults["adagc"].beta, defaults["adagc"].lambda_rel, defaults["adagc"].warmup_steps) == (0.98, 1.05, 100)


# ------------------------------------------------------------------------ study and sweep
def test_adaptive_clipping_study_variants():
    from jobs import compose_job, study_variants
    from gradsweep.sweep.hydra_adapter import to_spec

    for study, models, n_lr in (("adaptive_clipping", {"srn"}, 7), ("adaptive_clipping_mlp", {"mlp"}, 9)):
        variants = study_variants(study)
        assert len(variants) == n_lr * 6
        assert [v[1] for v in variants[::n_lr]] == [f"clip={r}" for r in ("none", "norm", "autoclip", "agc",
                                                                                       "zclip", "adagc")]
        specs = [to_spec(compose_job(v)) for v in (variants[n_lr], variants[-1])]  # norm and adagc validate
        assert {s.model.name for s in specs} == models and specs[0].clip.max_norm in (3.0, 10.0)
        lrs = sorted(float(v[2].split("=")[1]) for v in variants[:n_lr])
        assert all(b == pytest.approx(2 * a) for a, b in zip(lrs, lrs[1:], strict=False))  # a x2 ladder (neighbours)


def test_clip_methods_space_is_conditional():
    import optuna

    from gradsweep.sweep.search_spaces import CLIP_RULE_PARAMS, clip_methods

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        trial = study.ask()
        clip_methods(None, trial)
        study.tell(trial, 0.0)
    assert {t.params["clip"] for t in study.trials} == set(CLIP_RULE_PARAMS)
    for t in study.trials:
        own = CLIP_RULE_PARAMS[t.params["clip"]]
        assert set(t.params) == {"clip", *own}  # only the drawn rule's own hyperparameter
        for name, (lo, hi, _) in own.items():
            assert lo <= t.params[name] <= hi


def test_clip_methods_sweep_composes():
    from gradsweep.paths import ROOT
    from gradsweep.sweep.hydra_adapter import compose_config, to_spec
    from gradsweep.sweep.search_spaces import CLIP_RULE_PARAMS

    cfg = compose_config(ROOT / "conf", ["+sweep=clip_methods"], hydra_config=True)
    sw = cfg.hydra.sweeper
    assert sw.study_name == "clip_methods" and sw.custom_search_space == "gradsweep.sweep.search_spaces.clip_methods"
    assert "optimizer.lr" in sw.params
    for rule, own in CLIP_RULE_PARAMS.items():  # every drawable combination is a valid job
        ov = [f"{name}={(lo * hi) ** 0.5 if log else (lo + hi) / 2}" for name, (lo, hi, log) in own.items()]
        spec = to_spec(compose_config(ROOT / "conf", ["+sweep=clip_methods", f"clip={rule}", *ov]))
        assert spec.clip.name == rule


def test_comparison_table_judges_divergence_per_run_and_stability_per_lr():
    from gradsweep.report.comparison import ClipRun, comparison_rows
    from gradsweep.studies.regenerate import classic_studies

    def run(rule, lr, seed, status="FINISHED", end=150.0, dev=0.5):
        return ClipRun("mlp", rule, lr, seed, status, "", dev, 160.0, end, 0.25)

    runs = [run("none", 0.1, s, dev=0.9) for s in range(3)]
    runs += [run("none", 0.2, 0), run("none", 0.2, 1, status="FAILED"), run("none", 0.2, 2)]  # one NaN seed
    runs += [run("none", 0.4, s, end=170.0) for s in range(3)]  # the loss ended above its start
    runs += [run("norm 30", lr, s, dev=0.8 + lr / 10) for lr in (0.1, 0.2, 0.4) for s in range(3)]
    rows, curves = comparison_rows(runs, 30.0)
    assert rows[0] == "| none | 0.1 | 0.1 | 0.900 [0.900-0.900] | 0.94 | 25% | 4/9 (1 non-finite) |"
    assert rows[1].startswith("| norm 30 (tuned) | 0.4 (top) | 0.4 | 0.840 [0.840-0.840] |")
    assert curves["none"][2] == [0.0, 1 / 3, 1.0]  # fraction of seeds diverged per lr
    assert "adaptive_clipping" not in classic_studies() and "srn_explosion" in classic_studies()


def test_docs_hold_the_comparison_block():
    from gradsweep.paths import ROOT

    text = (ROOT / "docs" / "studies.md").read_text()
    assert "<!-- gradsweep studies: adaptive_clipping -->" in text and "<!-- end adaptive_clipping -->" in text
