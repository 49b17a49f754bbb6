"""Scheduled sweeps: cadence, no overlap (one or two schedulers), study continuation, SIGTERM, locks."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pytest

from conftest import ROOT
from gradsweep.errors import ConfigError
from gradsweep.track.delivery import mlflow_client  # takes turns creating a new store with the jobs
from gradsweep.sweep.schedule import Schedule, SweepBusy, cron_trigger, missed_runs, sweep_lock
from postgres import postgres_server  # noqa: F401

pytestmark = pytest.mark.integration

GRADSWEEP = str(Path(sys.executable).parent / "gradsweep")


def write_sweep(folder: Path, cron: str = "*/3 * * * * *", trials: int = 1) -> Path:
    sweeps = folder / "sweeps"
    sweeps.mkdir(parents=True, exist_ok=True)
    (sweeps / "tiny.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        defaults:
          - override /hydra/sweeper: gradsweep_optuna
          - override /hydra/sweeper/pruner: none
        trainer:
          epochs: 1
        hydra:
          sweeper:
            study_name: tiny
            storage: sqlite:///{folder}/optuna.db
            n_trials: 3
            params:
              optimizer.lr: tag(log, interval(0.01, 1.0))
        schedule:
          cron: "{cron}"
          timezone: UTC
          trials_per_run: {trials}
        """))
    return sweeps


def env_for(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["GRADSWEEP_SWEEPS_DIR"] = str(folder / "sweeps")
    return env


def parents(store: str) -> list:
    client = mlflow_client(store)
    exp = client.get_experiment_by_name("gradsweep")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.schedule = 'tiny'") if exp else []
    return sorted(runs, key=lambda r: r.info.start_time)


def assert_no_overlap(runs) -> None:
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):  # neighbours: one fewer
        assert end <= start, "two runs of the same sweep overlapped"


def test_schedulers_run_on_time_one_at_a_time_and_continue_the_study(tmp_path):
    """Two schedulers of one sweep fire together: one runs, the other stands down; every run is
    recorded FINISHED at its scheduled time, none overlaps another, and each continues the study."""
    write_sweep(tmp_path)
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cmd = [GRADSWEEP, "schedule", "--max-runs", "2", f"tracking.uri={store}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "already running" in "".join(outs)  # the two fired together: one ran, the other stood down
    runs = parents(store)
    assert 1 <= len(runs) <= 3 and all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["scheduled_at"] for r in runs)
    assert_no_overlap(runs)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.number for t in study.trials] == list(range(len(runs)))  # one study continued, one trial per run


def test_sigterm_leaves_nothing_running(tmp_path):
    write_sweep(tmp_path)
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    proc = subprocess.Popen([GRADSWEEP, "sweep", "run", "tiny", "trainer.epochs=100000", f"tracking.uri={store}"],
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = mlflow_client(store)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("gradsweep")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if any("mlflow.parentRunId" in r.data.tags and r.info.status == "RUNNING" for r in runs):
            break
        assert proc.poll() is None, "the sweep ended before its trial started"
        time.sleep(0.2)
    else:
        pytest.fail("the trial never started")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) != 0
    runs = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags} == {"KILLED"}
    assert {r.data.tags["optuna.state"] for r in runs if "mlflow.parentRunId" in r.data.tags} == {"FAIL"}
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.trials and all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)


def test_missed_runs_coalesce_into_one_at_start(tmp_path):
    # hourly, half an hour from now: the catch-up is the only run during the test (with "*/10" a
    # test that met a 10-minute mark had its catch-up skipped as busy behind the cron's own run)
    now = datetime.now(timezone.utc)
    write_sweep(tmp_path, cron=f"{(now.minute + 30) % 60} * * * *")
    state = tmp_path / "mlruns" / "schedules" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"tiny": (now - timedelta(hours=3)).isoformat()}))
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    res = subprocess.run([GRADSWEEP, "schedule", "--max-runs", "1", f"tracking.uri={store}"], cwd=tmp_path,
                         env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stderr.splitlines() if "missed" in ln]
    assert len(line) == 1 and "coalescing them into one run" in line[0]
    assert int(line[0].split("tiny: ")[1].split()[0]) == 3
    assert len(parents(store)) == 1


@pytest.mark.parametrize("schedule,message", [
    ("cron: 5", "schedule.cron=5 is a int; allowed: a quoted string"),
    ("cron: '0 * * * *'\n  timezone: 5", "schedule.timezone=5 is a int"),
    ("cron: '0 0 31 2 *'", "never fires"),
    ("cron: '0 * * * *'\n  enabled: 'yes'", "schedule.enabled='yes'; allowed: true|false"),
])
def test_bad_schedules_are_one_line_also_in_the_list(tmp_path, schedule, message):
    sweeps = write_sweep(tmp_path)
    text = (sweeps / "tiny.yaml").read_text()
    (sweeps / "tiny.yaml").write_text(text[:text.index("schedule:")] + "schedule:\n  " + schedule + "\n")
    for args in (["schedule", "--max-runs", "1"], ["sweep", "list"]):
        res = subprocess.run([GRADSWEEP, *args], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                             text=True, timeout=60)
        out = (res.stdout + res.stderr).strip()
        assert "Traceback" not in out and message in out, (args, out)
        if args[0] == "schedule":
            assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, out


def test_missed_runs_count_and_cron_errors():
    sched = Schedule("x", "0 * * * *")
    last = datetime(2026, 1, 1, 0, 30, tzinfo=timezone.utc)
    assert missed_runs(sched, last, last + timedelta(hours=3)) == 3
    assert missed_runs(sched, None, last) == 0
    with pytest.raises(ConfigError, match="allowed: 5"):
        cron_trigger("* * *")
    with pytest.raises(ConfigError, match="is invalid"):
        cron_trigger("99 * * * *")


def test_file_lock_is_exclusive_and_released_when_the_holder_dies(tmp_path):
    with sweep_lock("s", None, tmp_path):
        with pytest.raises(SweepBusy, match="already running"):
            with sweep_lock("s", None, tmp_path):
                pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from gradsweep.sweep.schedule import sweep_lock; from pathlib import Path;"
                               "cm = sweep_lock('s', None, Path(sys.argv[2])); cm.__enter__();"
                               "print('held', flush=True);"
                               "time.sleep(600)", str(ROOT / "src"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SweepBusy):
        with sweep_lock("s", None, tmp_path):
            pass
    holder.kill()
    holder.wait()
    with sweep_lock("s", None, tmp_path):  # a killed holder leaves no stale lock
        pass


def test_postgres_advisory_lock(postgres_server):  # noqa: F811
    with sweep_lock("s", postgres_server.uri, Path("/nonexistent")):
        with pytest.raises(SweepBusy, match="advisory lock"):
            with sweep_lock("s", postgres_server.uri, Path("/nonexistent")):
                pass
        with sweep_lock("other", postgres_server.uri, Path("/nonexistent")):
            pass
    with sweep_lock("s", postgres_server.uri, Path("/nonexistent")):
        pass


def test_sigkilled_sweep_restarts_with_nothing_left_running(tmp_path):
    """A sweep worker killed with SIGKILL: the restarted sweep fails its orphaned trial in Optuna,
    closes the dead runs KILLED in MLflow, and runs its own budget."""
    write_sweep(tmp_path)
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "-m", "+sweep=tiny", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2", f"tracking.uri={store}"]
    proc = subprocess.Popen([*cmd, "trainer.epochs=100000"], cwd=tmp_path, env=env_for(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = mlflow_client(store)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("gradsweep")
        if exp and client.search_runs([exp.experiment_id], "tags.`optuna.trial_number` = '0'"):
            break
        assert proc.poll() is None, "the sweep ended before its trial started"
        time.sleep(0.2)
    else:
        pytest.fail("the trial never started")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    time.sleep(3)  # past the trial's heartbeat grace period
    exp_id = client.get_experiment_by_name("gradsweep").experiment_id
    assert client.search_runs([exp_id], "attributes.status = 'RUNNING'")  # left behind by the kill
    res = subprocess.run([*cmd, "trainer.epochs=1"], cwd=tmp_path, env=env_for(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = client.search_runs([exp_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED" and r.data.tags.get("failure") == "worker_died"]
    assert len(killed) == 2  # the dead sweep's parent and its trial
    assert [r.data.tags["optuna.state"] for r in killed if "optuna.trial_number" in r.data.tags] == ["FAIL"]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]  # the orphan failed, the restart ran its budget of 2
    orphan = min(study.trials, key=lambda t: t.number)
    assert "no heartbeat" in orphan.user_attrs["gradsweep_failure"]  # why, by its beats (no process id)


def test_storage_with_a_password_is_refused(tmp_path):
    write_sweep(tmp_path)
    env = {**env_for(tmp_path), "GRADSWEEP_OPTUNA_STORAGE": "postgresql://optuna:hunter2@db.lab/optuna"}
    res = subprocess.run([GRADSWEEP, "sweep", "run", "tiny"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "GRADSWEEP_OPTUNA_STORAGE=" in lines[0], res.stderr
    assert "holds a password" in lines[0] and "PGPASSWORD" in lines[0] and "hunter2" not in res.stderr
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "multirun").exists()


def test_lock_is_tied_to_the_study_not_the_working_directory(tmp_path):
    """Two starts of one sweep from different folders share its study file, so they share its lock."""
    write_sweep(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with sweep_lock("tiny", storage):
        res = subprocess.run([GRADSWEEP, "sweep", "run", "tiny"], cwd=elsewhere, env=env_for(tmp_path),
                             capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "already running" in res.stderr and f"pid {os.getpid()}" in res.stderr, res.stderr
    assert not (elsewhere / "mlruns").exists()
    assert (tmp_path / ".optuna.db.tiny.sweep.lock").exists()


def test_a_bad_sweep_file_is_one_line_and_does_not_stop_the_others(tmp_path, monkeypatch, caplog):
    from gradsweep.sweep.schedule import Scheduler

    sweeps = write_sweep(tmp_path)
    (sweeps / "tabbed.yaml").write_text("# @package _global_\ntrainer:\n\tepochs: 1\n")
    (sweeps / "tagged.yaml").write_text('x: !!python/object/apply:os.system ["touch pwned"]\n')
    res = subprocess.run([GRADSWEEP, "sweep", "run", "tagged"], cwd=tmp_path, env=env_for(tmp_path),
                         capture_output=True, text=True, timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "sweeps/tagged.yaml is not valid YAML" in lines[0], res.stderr
    assert "line 1" in lines[0] and not (tmp_path / "pwned").exists()
    monkeypatch.setenv("GRADSWEEP_SWEEPS_DIR", str(sweeps))
    scheduler = Scheduler(state_dir=tmp_path / "mlruns")  # the good sweep is scheduled, each bad file named once
    assert [s.sweep for s in scheduler.schedules] == ["tiny"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "tabbed.yaml is not valid YAML: found character '\\t'" in errors[0] and \
        "line 3" in errors[0] and "tagged.yaml" in errors[1]
    (sweeps / "tiny.yaml").unlink()
    with pytest.raises(ConfigError, match="2 sweep files are invalid"):
        Scheduler(state_dir=tmp_path / "mlruns")
