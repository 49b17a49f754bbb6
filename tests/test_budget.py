"""Memory estimates made from a config before anything is allocated (gradsweep.train.budget)."""
import pytest
import torch
from torch import nn

from gradsweep.errors import ConfigError
from gradsweep.train import budget
from gradsweep.train.data import DigitSumConfig

pytestmark = pytest.mark.unit


def test_the_estimate_counts_parameters_gradients_optimizer_state_and_activations_without_allocating():
    def make():
        return nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 3))

    params, acts = budget.model_bytes(make, torch.zeros(5, 10), batch=64, optimizer="adam")
    n = 10 * 1000 + 1000 + 1000 * 3 + 3
    assert params == n * 4 * (2 + 2)  # weights, gradients, Adam's two moments
    assert acts == 2 * 64 * (1000 + 1000 + 3) * 4  # every leaf's output, kept for backward
    huge = budget.model_bytes(lambda: nn.Linear(10 ** 6, 10 ** 6), torch.zeros(1, 10 ** 6), 1, "sgd")
    assert huge[0] == (10 ** 12 + 10 ** 6) * 4 * 3  # 12 TB counted on the meta device, none allocated


def test_a_model_that_cannot_be_built_on_meta_is_not_estimated():
    def make():
        m = nn.Linear(2, 2)
        m.weight.data.copy_(torch.ones(2, 2).to(m.weight.device)).sum().item()  # needs real storage
        return m

    assert budget.model_bytes(make, torch.zeros(1, 2), 1, "sgd") is None


def test_data_estimates_and_the_limit():
    assert budget.data_bytes(DigitSumConfig(train_copies=3)) == 500 * 21 * 16
    budget.check_data(DigitSumConfig(), 0)
    with pytest.raises(ConfigError,
                       match=r"data \(length=20, train_copies=10000000.*trainer.memory_limit_gb \(now 1\)"):
        budget.check_data(DigitSumConfig(train_copies=10 ** 7), 1)
    assert budget.limit_bytes(2) == 2 * budget.GB and 0 < budget.limit_bytes(0) <= budget.machine_memory()
