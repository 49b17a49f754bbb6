"""Gradient norms and clipping against torch's own reference implementations."""
import math

import pytest
import torch

from gradsweep.train.clipping import NormClip, NoClip, ValueClip
from gradsweep.train.models import SRNConfig
from gradsweep.train.models import SRN
from gradsweep.train.telemetry import GradientNorms

pytestmark = pytest.mark.unit


def _model_with_grads(seed=0, scale=50.0):
    torch.manual_seed(seed)
    model = SRN(SRNConfig(init="normal", init_std=0.5), 19)
    x = torch.randint(0, 10, (16, 12))
    loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 19, (16,)), reduction="sum") * scale
    loss.backward()
    return model


def test_param_norms_equal_vector_norm_of_each_gradient():
    model = _model_with_grads()
    norms = GradientNorms(model)
    got = norms.per_param()
    want = torch.stack([torch.linalg.vector_norm(p.grad) for _, p in model.named_parameters()])
    assert norms.names == ["embedding.weight", "rnn.W", "rnn.U", "rnn.b", "classifier.weight", "classifier.bias"]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(norms.total(got),
                               torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in norms.params])))


@pytest.mark.parametrize("max_norm,norm_type", [(1.0, 2.0), (5.0, 2.0), (20.0, 2.0), (3.0, 1.0), (0.5, math.inf)])
def test_norm_clip_matches_clip_grad_norm_(max_norm, norm_type):
    a, b = _model_with_grads(), _model_with_grads()
    ref_total = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm, norm_type)
    norms = GradientNorms(a)
    grads = norms.grads()
    total_l2 = norms.total(norms.per_param(grads))
    coef, after = NormClip(max_norm, norm_type)(norms, grads, total_l2)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    assert ref_total > max_norm  # the case actually clips
    after_measured = norms.total(norms.per_param())
    torch.testing.assert_close(after, after_measured, rtol=1e-5, atol=1e-6)
    if norm_type == 2.0:
        assert float(after) <= max_norm * (1 + 1e-6)
    assert 0 < float(coef) < 1


def test_value_clip_and_no_clip():
    a, b = _model_with_grads(), _model_with_grads()
    torch.nn.utils.clip_grad_value_(list(b.parameters()), 0.1)
    norms = GradientNorms(a)
    total = norms.total(norms.per_param())
    coef, after = ValueClip(0.1)(norms, norms.grads(), total)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    torch.testing.assert_close(coef * total, after)
    coef, after = NoClip()(norms, norms.grads(), after)
    assert float(coef) == 1.0
