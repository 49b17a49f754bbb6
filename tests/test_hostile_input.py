"""Property test: malformed overrides through the CLI entry -> exit 2, one line, nothing created."""
import importlib.util
import os
import string
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TRAIN
from gradsweep.cli.hydra_main import run_cli

spec = importlib.util.spec_from_file_location("gradsweep_train_entry", TRAIN)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

junk = st.text(alphabet=string.ascii_letters + string.digits + "_-.:/@#%", min_size=1, max_size=12)
negative = st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(repr)
not_a_number = junk.filter(lambda s: not _is_number(s))


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return s.lower() in ("nan", "inf", "-inf", "+inf", "true", "false", "null", "none")


bad_override = st.one_of(
    st.builds(lambda v: f"optimizer.lr={v}", st.one_of(negative, not_a_number, st.just("nan"), st.just("inf"))),
    st.builds(lambda v: f"clip.max_norm={v}", st.one_of(negative, not_a_number)),
    st.builds(lambda v: f"trainer.epochs={v}", st.one_of(st.integers(max_value=0).map(str), not_a_number)),
    st.builds(lambda v: f"model.num_layers={v}", st.one_of(st.integers(max_value=0).map(str), st.just("2.5"))),
    st.builds(lambda v: f"model={v}", junk.filter(lambda s: s not in ("srn", "lstm", "gru", "mlp", "cnn"))),
    st.builds(lambda v: f"clip={v}", junk.filter(lambda s: s not in ("none", "norm", "value"))),
    st.builds(lambda k: f"model.{k}=1", st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=10)
              .filter(lambda k: k not in ("name", "num_layers", "input_size", "hidden_size", "init", "init_std"))),
    st.builds(lambda v: f"tracking.uri={v}", junk.filter(lambda s: "://" not in s)),
    st.builds(lambda v: f"trainer.reduction={v}", junk.filter(lambda s: s not in ("sum", "mean"))),
    st.sampled_from(["a=b=c", "=1", "clip.max_norm=[1,2", "optimizer.lr='0.1", "model=",
                     "data.length=2", "trainer.batch_size=-1", "clip.norm_type=0",
                     "trainer.device=tpu", "data.path=/definitely/not/here"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(override=bad_override, multirun=st.booleans())
def test_malformed_override_is_rejected_cleanly(override, multirun, tmp_path, capsys, monkeypatch):
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by all examples; each gets its own
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    argv = ["train.py", *(["-m"] if multirun else []), override, f"tracking.uri=sqlite:///{store}/mlflow.db"]
    if override.startswith("tracking.uri="):
        argv = argv[:-1]
    monkeypatch.setattr(sys, "argv", argv)
    assert "HYDRA_FULL_ERROR" not in os.environ  # run_cli leaves no trace for the next call
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.CONFIG_DIR, "config")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, (override, err)
    assert len(err) == 1 and err[0].startswith("error: "), (override, err)
    assert not store.exists() and not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
