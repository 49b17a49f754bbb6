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
from gradsweep.errors import CheckpointError, ConfigError, DataError
from gradsweep.paths import CONF_DIR
from gradsweep.train.checkpoints import load_checkpoint
from gradsweep.train.data import DigitSumConfig, generate_digit_sum, read_digit_sum, write_digit_sum

pytestmark = pytest.mark.integration

spec = importlib.util.spec_from_file_location("gradsweep_train_entry", TRAIN)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

def options(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.endswith("_schema")}


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
    st.builds(lambda v: f"model={v}", junk.filter(lambda s: s not in options("model"))),
    st.builds(lambda v: f"clip={v}", junk.filter(lambda s: s not in options("clip"))),
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


# ------------------------------------------------------------------ past the command line
line = st.one_of(
    st.text(max_size=40),  # any text, other scripts' digits included
    st.builds(lambda d, lab: " ".join(d) + "\t" + lab,
              st.lists(st.sampled_from(list("0123456789") + ["1_0", "+1", "-1", "\u0663", "x", ""]), max_size=6),
              st.sampled_from(["3", "18", "19", "-1", "1_0", "\u0666", "", " 4 ", "4.0"])),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=5), raw=st.binary(max_size=64), use_raw=st.booleans())
def test_a_malformed_data_file_is_a_data_error_or_valid_digits(lines, raw, use_raw, tmp_path):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    write_digit_sum(folder, generate_digit_sum(DigitSumConfig(length=4, train_copies=1)))
    good = (folder / "train.txt").read_text().splitlines()
    (folder / "train.txt").write_bytes(raw if use_raw else "\n".join(good[:3] + lines).encode())
    try:
        data = read_digit_sum(folder)
    except DataError as e:
        assert str(e).count("\n") == 0 and "train.txt" in str(e)
        return
    x, y = data["train"]  # what loads is digits 0-9 and labels 0-18, nothing else slipped through
    assert x.min() >= 0 and x.max() <= 9 and y.min() >= 0 and y.max() <= 18


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256))
def test_a_malformed_checkpoint_is_a_checkpoint_error(raw, tmp_path):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "last.pt"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=st.dictionaries(st.sampled_from(["cron", "timezone", "trials_per_run", "enabled", "every"]),
                                st.one_of(st.integers(), st.text(max_size=12), st.booleans(), st.none(),
                                          st.sampled_from(["0 0 31 2 *", "*/5 * * * *", "UTC", "Mars/Olympus"])),
                                max_size=4))
def test_a_malformed_schedule_is_a_config_error(schedule, tmp_path, monkeypatch):
    import yaml

    from gradsweep.sweep.schedule import load_schedule

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "s.yaml").write_text(yaml.safe_dump({"schedule": schedule}))
    monkeypatch.setenv("GRADSWEEP_SWEEPS_DIR", str(folder))
    try:
        sched = load_schedule("s")
    except ConfigError as e:
        assert "\n" not in str(e) and "sweeps/s.yaml" in str(e)
        return
    assert sched is None or (isinstance(sched.cron, str) and sched.trials_per_run >= 1)


def test_query_string_credentials_are_masked_and_refused():
    from gradsweep.errors import ConfigError
    from gradsweep.track.uri import mask, refuse_password

    assert mask("https://h:5000/api/?access_token=abc&region=eu") == "https://h:5000/api/?access_token=***&region=eu"
    assert mask("https://u:pw@h/?Signature=abc") == "https://u:***@h/?Signature=***"
    assert mask("http://h/?page=2") == "http://h/?page=2"
    for uri in ("http://h/?token=abc", "http://h/?API_KEY=abc", "postgresql://db/x?password=abc"):
        with pytest.raises(ConfigError, match="holds a credential in its query string") as e:
            refuse_password("tracking.uri", uri)
        assert "abc" not in str(e.value)
    refuse_password("tracking.uri", "http://h/?page=2")  # an ordinary query is fine
    assert mask("sqlite:////abs/mlflow.db?token=abc") == "sqlite:////abs/mlflow.db?token=***"
    for uri in ("sqlite:///mlruns/mlflow.db", "sqlite:////abs/mlflow.db", "http://h:5000"):
        assert mask(uri) == uri  # nothing to mask: the URI exactly as given
