"""Your model, your data: `model=custom` / `data=custom` from a package outside the repository, as a
user would have it (on PYTHONPATH), through the real CLI and sweeps; the tasks (classification,
binary, regression, next-token LM) in process."""
from __future__ import annotations

import math
import os
import textwrap

import pytest
from mlflow.tracking import MlflowClient

import gradsweep
from conftest import run_train, stored
from jobs import run_inprocess

pytestmark = pytest.mark.unit

PACKAGE = {
    "__init__.py": "",
    "nets.py": """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, hidden=16, classes=3):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, classes))
            def forward(self, x):
                return self.body(x)

        class Regressor(nn.Module):
            def __init__(self, hidden=8):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            def forward(self, x):
                return self.body(x).squeeze(-1)

        class TinyLM(nn.Module):
            def __init__(self, vocab=11, dim=8):
                super().__init__()
                self.emb, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
            def forward(self, x):
                return self.out(torch.tanh(self.emb(x)))

        class OneLogit(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 1)
            def forward(self, x):
                return self.lin(x)

        def not_a_module():
            return 42
    """,
    "data.py": """
        import torch
        from torch.utils.data import Dataset, TensorDataset

        def make(n=300, seed=0, task="classes"):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, 4, generator=g)
            if task == "classes":
                y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
            elif task == "binary":
                y = (x[:, 0] > 0).long()
            else:
                y = x[:, 0] * 2 - x[:, 1]
            a, b = int(n * 0.6), int(n * 0.8)
            return TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]), TensorDataset(x[b:], y[b:])

        class Counting(Dataset):
            # next-token pairs of a counting sequence mod 11: x = tokens, y = the next tokens
            def __init__(self, n, start):
                self.items = [(torch.arange(s, s + 6) % 11, torch.arange(s + 1, s + 7) % 11)
                              for s in range(start, start + n)]
            def __len__(self):
                return len(self.items)
            def __getitem__(self, i):
                return self.items[i]

        def counting():
            return Counting(64, 0), Counting(16, 3), Counting(16, 5)
    """,
}


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_code")  # outside the repository, as a user's own package
    pkg = root / "mypkg"
    pkg.mkdir()
    for name, text in PACKAGE.items():
        (pkg / name).write_text(textwrap.dedent(text))
    return root


def _env(user_pkg):
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(user_pkg), os.environ.get("PYTHONPATH")) if p)}


CUSTOM = ["model=custom", "model._target_=mypkg.nets.Net", "data=custom", "data._target_=mypkg.data.make"]


@pytest.mark.integration
def test_a_sweep_of_the_users_model_and_data_then_a_resume(user_pkg, tmp_path, store):
    res = run_train(["-m", *CUSTOM, "+model.hidden=8,16", "trainer.epochs=3", f"tracking.uri={store}"], tmp_path,
                    env=_env(user_pkg))
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.data.params["model.kwargs.hidden"] for r in children) == ["16", "8"]
    for r in children:  # per-tensor norms of the user's own parameter names, a verdict, a dense history
        assert {"grad_norm/body.0.weight", "grad_norm/body.2.bias"} <= set(r.data.metrics)
        assert r.data.tags["grad_health"]
        assert list(gradsweep.history(r.info.run_id, tracking_uri=store).index) == list(range(9))
    (first,) = [r for r in children if r.data.params["model.kwargs.hidden"] == "8"]
    ckpt = stored(store, first.info.run_id, "checkpoints/last.pt")  # the store's copy: the job folder keeps none
    res = run_train([*CUSTOM, "+model.hidden=8", "trainer.epochs=5", f"trainer.resume_from={ckpt}",
                     f"tracking.uri={store}"], tmp_path, env=_env(user_pkg))
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("gradsweep.resumed_from")]
    assert len(resumed) == 1 and resumed[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(resumed[0].info.run_id, "grad_norm/total"))
    assert steps == list(range(9, 15))  # continued from the checkpoint's step


@pytest.mark.integration
@pytest.mark.parametrize("args,message", [
    (["model._target_=nope.Net"], "model._target_='nope.Net': module nope not found on PYTHONPATH or installed"),
    (["model._target_=mypkg.nets.not_a_module"], "model._target_='mypkg.nets.not_a_module': returned 'int', not a "
                                                  "torch.nn.Module"),
    (["model._target_=mypkg.nets.OneLogit"], "model._target_='mypkg.nets.OneLogit': outputs [2, 1] for targets [2] do "
                                             "not fit trainer.loss=cross_entropy; allowed: (batch, classes) logits"),
    (["+model.hiden=3"], "model._target_='mypkg.nets.Net': Net.__init__() got an unexpected keyword argument 'hiden'"),
    (["data._target_=mypkg.data.nope"], "data._target_='mypkg.data.nope': mypkg.data has no nope"),
])
def test_a_wrong_target_is_one_line_before_any_run(user_pkg, tmp_path, args, message):
    overrides = {a.split("=")[0].lstrip("+"): a for a in CUSTOM + args}
    res = run_train(list(overrides.values()), tmp_path, env=_env(user_pkg))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines[-1].startswith(f"error: {message}"), res.stderr[-2000:]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing created


@pytest.fixture
def on_path(user_pkg, monkeypatch):
    monkeypatch.syspath_prepend(str(user_pkg))


@pytest.mark.parametrize("model,data,loss", [
    ("mypkg.nets.Regressor", "mypkg.data.make", "mse"),
    ("mypkg.nets.TinyLM", "mypkg.data.counting", "lm"),
    ("mypkg.nets.OneLogit", "mypkg.data.make", "bce"),
])
def test_the_task_decides_loss_and_accuracy(on_path, tmp_path, model, data, loss):
    extra = {"mse": ["+data.task=regression"], "bce": ["+data.task=binary"], "lm": []}[loss]
    out = run_inprocess(["model=custom", f"model._target_={model}", "data=custom", f"data._target_={data}",
                         f"trainer.loss={loss}", "trainer.epochs=4", *extra], tmp_path, "memory")
    assert out.status == "FINISHED", out.error
    m = out.run.metrics
    if loss == "mse":  # no accuracy; the best checkpoint and the objective by dev loss
        assert "dev/acc" not in m and "best/dev_acc" not in m and "train/acc" not in m
        assert out.objective == pytest.approx(-m["best/dev_loss"][0][1])
    elif loss == "lm":  # token accuracy and perplexity
        assert 0 <= m["dev/acc"][-1][1] <= 1 and m["test/ppl"][0][1] == pytest.approx(math.exp(m["test/loss"][0][1]))
        assert all(0 <= v <= 1 for _, v in m["train/acc"])
    else:  # one logit per example against 0/1 targets
        assert 0 <= m["best/dev_acc"][0][1] <= 1 and out.objective == m["best/dev_acc"][0][1]
        assert all(0 <= v <= 1 for _, v in m["train/acc"])
    assert {k for k in m if k.startswith("grad_norm/")} > {"grad_norm/total"}
