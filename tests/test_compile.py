"""trainer.compile=true: the model runs through torch.compile and the run records what an
uncompiled run records: the same metric names (none with compile's ``_orig_mod.`` prefix) and the
same norms on the first steps. The default test run compiles with the ``eager`` backend (Dynamo
traces and wraps the model as inductor does, in about a second); inductor itself generates kernels,
which takes tens of seconds on a CPU with a cold cache: its case is marked slow."""
import numpy as np
import pytest
import torch
from torch import nn

import gradsweep
from jobs import run_inprocess

pytestmark = pytest.mark.unit

SHORT = ["trainer.epochs=1", "tracking.log_checkpoints=false"]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_job_records_the_uncompiled_names_and_norms(tmp_path, monkeypatch, backend):
    backends = []

    def compile_(model, **kwargs):  # the real torch.compile, noting that the loop asked for it
        backends.append(kwargs.get("backend"))
        return real(model, **kwargs)

    real = torch.compile
    monkeypatch.setattr(torch, "compile", compile_)
    plain = run_inprocess(SHORT, tmp_path / "plain", "memory")
    assert backends == []
    compiled = run_inprocess([*SHORT, "trainer.compile=true", f"trainer.compile_backend={backend}"], tmp_path / "c",
                             "memory")
    assert backends == [backend]
    assert plain.status == compiled.status == "FINISHED"
    assert compiled.history.names == plain.history.names  # exactly: no `_orig_mod.` anywhere
    for name in (n for n in plain.history.names if n.startswith("grad_norm/")):
        a, b = (np.asarray(run.history.history[name][1][:3], dtype=float) for run in (plain, compiled))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name)


def test_watch_names_a_compiled_models_parameters_as_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    compiled = torch.compile(model, backend="eager")
    assert [n for n, _ in compiled.named_parameters()][0].startswith("_orig_mod.")  # what the wrapper names
    with gradsweep.watch(compiled, backend="memory") as gs:
        compiled(torch.randn(5, 4)).square().sum().backward()
        gs.step(loss=1.0)
    assert gs.names[-4:] == [f"grad_norm/{n}" for n, _ in model.named_parameters()]
    norms = gs.history.history["grad_norm/0.weight"][1]
    assert norms[0] == pytest.approx(float(model[0].weight.grad.norm()), rel=1e-6)


@pytest.mark.parametrize("value", ["tvm", "Inductor"])
def test_an_unknown_compile_backend_is_one_line(value):
    from gradsweep.errors import ConfigError
    from gradsweep.train.loop import TrainerConfig

    with pytest.raises(ConfigError) as e:
        TrainerConfig(compile=True, compile_backend=value)
    assert str(e.value) == f"trainer.compile_backend={value!r} is invalid; allowed: inductor|aot_eager|eager"
