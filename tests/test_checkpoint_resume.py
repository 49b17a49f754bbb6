"""Checkpoints load with weights_only=True and resuming continues a run exactly (CPU, fixed seed)."""
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TRAIN, run_train, stored
from gradsweep.track.delivery import pending
from gradsweep.track.journal import has_artifact

pytestmark = pytest.mark.integration


def kill_after_first_checkpoint(proc, spool, deadline) -> bool:
    """SIGKILL ``proc`` as soon as its own run journal records a checkpoint artifact."""
    while time.monotonic() < deadline and proc.poll() is None:
        if any(has_artifact(f, "checkpoints") for f in pending(spool, owner_pid=proc.pid)):
            proc.send_signal(signal.SIGKILL)
            proc.wait(60)
            return True
        time.sleep(0.01)
    return False


def _stopped_once_writing(proc, spool, timeout=180):
    """SIGSTOP ``proc`` once it has opened its run's journal: a live writer that writes nothing meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if pending(spool, owner_pid=proc.pid):
            proc.send_signal(signal.SIGSTOP)
            return
        time.sleep(0.005)
    raise AssertionError(f"no journal of {proc.pid} in {spool}: {proc.communicate()}")


def _runs(store):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("gradsweep")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _last(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)[-1]


def test_resume_from_checkpoint_path_equals_uninterrupted(tmp_path, store):
    """In this process (the resume logic is the job's; the process-level resume is the SIGKILL test's)."""
    from jobs import run_inprocess

    common = ["trainer.eval_every_steps=5"]
    full = run_inprocess(["trainer.epochs=4", *common], tmp_path / "full", store)
    half = run_inprocess(["trainer.epochs=2", *common], tmp_path / "half", store)
    assert full.status == half.status == "FINISHED"
    # one copy of each checkpoint: the store's (tracking.keep_local_artifacts=false), the job folder's is gone
    assert not (tmp_path / "half" / "checkpoints").exists() and (tmp_path / "half" / "config.yaml").is_file()
    ckpt = stored(store, half.run_id, "checkpoints/last.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 10 and state["epoch"] == 2 and state["best_score"] >= 0
    resumed = run_inprocess(["trainer.epochs=4", f"trainer.resume_from={ckpt}", *common], tmp_path / "resumed", store)
    assert resumed.status == "FINISHED"
    client = MlflowClient(store)
    r_res = client.get_run(resumed.run_id)
    assert r_res.data.tags["gradsweep.resumed_from"] == str(ckpt)
    steps = sorted(m.step for m in client.get_metric_history(resumed.run_id, "grad_norm/total"))
    assert steps == list(range(10, 20))  # continued where the checkpoint left off
    for key in ("train/loss", "grad_norm/total", "grad_norm/rnn.U", "test/acc", "best/dev_acc"):
        assert _last(client, resumed.run_id, key).value == _last(client, full.run_id, key).value, key
    a = torch.load(stored(store, full.run_id, "checkpoints/last.pt"), weights_only=True)
    b = torch.load(stored(store, resumed.run_id, "checkpoints/last.pt"), weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resuming_a_finished_run_starts_a_new_run_linked_to_it(tmp_path, store, caplog):
    """A FINISHED run's history is not rewritten (a sweep's summary describes it): the resume is a new
    run tagged with the original's id, continuing from its last checkpoint; the original stays as it was."""
    import logging

    import gradsweep
    from jobs import run_inprocess

    first = run_inprocess(["trainer.epochs=2", "trainer.eval_every_steps=5"], tmp_path / "first", store)
    client = MlflowClient(store)

    def snapshot(run_id):
        run = client.get_run(run_id)
        return (run.info.status, run.info.end_time, dict(run.data.tags), dict(run.data.metrics),
                {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics},
                len(gradsweep.history(run_id, tracking_uri=store)))

    before = snapshot(first.run_id)
    assert not (tmp_path / "first" / "checkpoints").exists()  # resumed from the store's copy, the only one
    with caplog.at_level(logging.INFO, logger="gradsweep"):
        again = run_inprocess(["trainer.epochs=3", f"trainer.resume_from={first.run_id}",
                               "trainer.eval_every_steps=5"], tmp_path / "again", store)
    assert again.status == "FINISHED" and again.run_id != first.run_id
    assert snapshot(first.run_id) == before  # status, end time, tags, every metric's length, dense history
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert said == [f"resume: run {first.run_id} is FINISHED and stays as it is; a new run "
                    "(tag gradsweep.resumed_from) continues it from step 10"]
    new = client.get_run(again.run_id)
    assert new.data.tags["gradsweep.resumed_from"] == first.run_id and new.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(again.run_id, "grad_norm/total"))
    assert steps == list(range(10, 15))  # continued after the checkpoint's step
    assert list(gradsweep.history(again.run_id, tracking_uri=store).index) == list(range(10, 15))
    # the verdict covers the whole history: the original's steps and the new ones
    assert list(again.history.steps) == list(range(15))
    assert not (tmp_path / "again" / "resume").exists()  # the checkpoints fetched to resume from are not kept


def test_sigterm_marks_run_killed(tmp_path, store):
    proc = subprocess.Popen([sys.executable, str(TRAIN), "trainer.epochs=100000", f"tracking.uri={store}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait for the first progress line: steps have been taken and logged
        if "dev_acc" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    proc.wait(60)
    assert proc.returncode != 0
    client, (run,) = _runs(store)
    assert run.info.status == "KILLED"
    assert len(client.get_metric_history(run.info.run_id, "grad_norm/total")) > 0  # flushed before closing
    # the console names the run and the command that resumes it; the run holds the checkpoint it needs
    said = re.search(rf"run trainer.epochs=100000 \({run.info.run_id[:8]}\) ended KILLED at step (\d+) of 500000; "
                     rf"resume it from its last checkpoint:\n    python src/train.py "
                     rf"trainer.resume_from={run.info.run_id} "
                     rf"trainer.epochs=100000 tracking.uri={store}\n", rest)
    assert said, rest[-2000:]
    last = torch.load(client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path)),
                      weights_only=True)
    assert last["step"] == int(said.group(1)) > 0  # stopped between two steps, all of them recorded
    import gradsweep

    assert gradsweep.history(run.info.run_id, tracking_uri=store).index.max() == last["step"] - 1


def test_sigkill_then_resume_into_same_run_equals_uninterrupted(tmp_path, store):
    """A trial killed with SIGKILL after a checkpoint continues in the same MLflow run, exactly."""
    common = ["trainer.epochs=60", "trainer.eval_every_steps=100", "trainer.checkpoint_every_steps=50",
              f"tracking.uri={store}"]
    full = run_train([*common, "hydra.run.dir=full"], tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *common, "hydra.run.dir=killed"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill as soon as the run's own journal records its first checkpoint: watching the tracking store
    # instead raced with the end of training (delivery lags, and the 300 steps take well under a second).
    deadline = time.monotonic() + 180
    checkpointed = kill_after_first_checkpoint(proc, tmp_path / "mlruns" / "spool", deadline)
    assert checkpointed and proc.returncode == -signal.SIGKILL, "killed after its first checkpoint"
    client = MlflowClient(store)
    killed_run = None
    while time.monotonic() < deadline and killed_run is None:  # its delivery worker sends what it has
        runs = _runs(store)[1][1:]  # the uninterrupted run came first
        if runs and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
            killed_run = runs[0].info.run_id
        time.sleep(0.1)
    assert killed_run is not None, "the killed run's checkpoint reached the store"
    assert client.get_run(killed_run).info.status == "RUNNING"
    resume = [f"trainer.resume_from={killed_run}", *common]
    resumed = subprocess.Popen([sys.executable, str(TRAIN), *resume, "hydra.run.dir=resumed"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # while it runs (stopped: alive, writing nothing), a second resume of the run, a job and a sweep given
    # its folder are refused in one line each, exit 2, before writing anything
    _stopped_once_writing(resumed, tmp_path / "mlruns" / "spool")
    try:
        second = [subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
                  for args in ([*resume, "hydra.run.dir=again"], [*common, "clip.max_norm=7", "hydra.run.dir=resumed"],
                               ["-m", *common, "clip.max_norm=5,7", "hydra.sweep.dir=resumed"])]
        refusals = [p.communicate(timeout=180)[1] for p in second]
    finally:
        resumed.send_signal(signal.SIGCONT)
    in_use = "the folder is in use by another running job or sweep"
    for proc, err, what in zip(second, refusals, (
            f"trainer.resume_from={killed_run}: the run is being written by a live process",
            f"hydra.run.dir={tmp_path / 'resumed'}: {in_use}", f"hydra.sweep.dir={tmp_path / 'resumed'}: {in_use}"),
            strict=True):
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {what}"), err[-3000:]
        assert f"(pid {resumed.pid} on " in lines[0]  # who holds it
    assert not (tmp_path / "again" / "config.yaml").exists() and len(_runs(store)[1]) == 2  # no run made
    assert resumed.wait(180) == 0, resumed.stderr.read()[-2000:]
    assert "max_norm: 7" not in (tmp_path / "resumed" / "config.yaml").read_text()
    run = client.get_run(killed_run)
    assert run.info.status == "FINISHED" and int(run.data.tags["gradsweep.resumed_at_step"]) % 50 == 0
    full_id = [r for r in _runs(store)[1] if r.info.run_id != killed_run][0].info.run_id
    for key in ("test/acc", "best/dev_acc", "train/loss", "grad_norm/total", "grad_norm/rnn.U"):
        assert _last(client, killed_run, key).value == _last(client, full_id, key).value, key
    steps = sorted(m.step for m in client.get_metric_history(killed_run, "grad_norm/total"))
    assert steps == list(range(300))  # every step once: none lost, none duplicated


def test_resume_sends_each_metric_only_after_the_step_the_run_holds():
    """Killed between a step's train and dev records: the re-run sends that step's dev metrics only."""
    from gradsweep.train.sinks import FromStep, HistorySink

    sent = HistorySink()
    sink = FromStep(sent, {"train/loss": 7, "grad_norm/total": 7, "dev/acc": 4})
    for step in range(5, 10):  # the checkpoint was at step 5
        sink.log_metrics(step, {"train/loss": 1.0, "grad_norm/total": 2.0})
        if step in (5, 7):
            sink.log_metrics(step, {"dev/acc": 0.5})
    sink.log_metrics(9, {"test/acc": 0.6})
    assert list(sent.history["train/loss"][0]) == [8, 9] and list(sent.history["grad_norm/total"][0]) == [8, 9]
    assert sent.history["dev/acc"][0] == [5, 7] and sent.history["test/acc"][0] == [9]


def _cli(args, cwd, capsys, monkeypatch):
    """src/train.py's entry in this process (what a user sees, without a Python start-up)."""
    import pytest

    from gradsweep.cli.hydra_main import run_cli
    from gradsweep.paths import CONF_DIR

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: None, str(CONF_DIR), "config")
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


CORRUPTIONS = [  # (name, how the checkpoint is spoiled, what the one line says)
    ("nan_weight", lambda s: s["model"]["rnn.W"].view(-1).__setitem__(3, float("nan")),
     "rnn.W holds non-finite values (NaN or Inf); allowed: "),
    ("config_list", _set("config", [1, 2]), "the checkpoint's config is a list; allowed: a mapping"),
    ("rng_type", lambda s: s["rng"].__setitem__("data", [1, 2, 3]),
     "the checkpoint's rng state 'data' does not fit this run (expected a torch.ByteTensor"),
    ("rng_size", lambda s: s["rng"].__setitem__("torch", torch.zeros(10, dtype=torch.uint8)),
     "the checkpoint's rng state 'torch' does not fit this run (Expected a CPUGeneratorImplState of size"),
    ("perm", _set("perm", torch.arange(7)), "the checkpoint's data order (perm, torch.int64 [7]) does not fit"),
    ("step_negative", _set("step", -5), "the checkpoint's step is -5; allowed: an integer from 0 to 10"),
    ("step_past", _set("step", 11), "the checkpoint's step is 11; allowed: an integer from 0 to 10"),
]


def test_resume_into_another_model_is_refused_before_any_run(tmp_path, store, capsys, monkeypatch):
    """A checkpoint of another model (a file, or a run id with a different hidden size) is an input
    error: one line, exit 2, no run created, and the run named keeps its status. So is a checkpoint
    of this model whose content is wrong (:data:`CORRUPTIONS`, a NaN in a run's best checkpoint)."""
    from jobs import run_inprocess

    mlp = run_inprocess(["model=mlp", "data=moons", "trainer.epochs=1"], tmp_path / "mlp", store)
    srn = run_inprocess(["trainer.epochs=1"], tmp_path / "srn", store)
    assert mlp.status == srn.status == "FINISHED"
    mlp_ckpt = stored(store, mlp.run_id, "checkpoints/last.pt")
    cases = [[f"trainer.resume_from={mlp_ckpt}"], ["-m", f"trainer.resume_from={mlp_ckpt}", "trainer.seed=0,1"]]
    for args in cases:  # checkpoint files are checked before Hydra starts
        code, lines = _cli([*args, "trainer.epochs=2", f"tracking.uri={store}"], tmp_path, capsys, monkeypatch)
        assert code == 2 and len(lines) == 1, lines
        assert "the checkpoint is of another model (model=mlp, data=moons): it lacks embedding.weight" in lines[0]
    # a checkpoint of this model whose content is wrong: one field spoiled each (NaN weights, a config
    # that is no mapping, RNG states and a data order that do not fit, a step outside the run)
    srn_ckpt = stored(store, srn.run_id, "checkpoints/last.pt")  # the store keeps the one copy
    for name, spoil, message in CORRUPTIONS:
        bad = tmp_path / name / "last.pt"
        bad.parent.mkdir()
        state = torch.load(srn_ckpt, weights_only=True)
        spoil(state)
        torch.save(state, bad)
        code, lines = _cli([f"trainer.resume_from={bad}", "trainer.epochs=2", f"tracking.uri={store}"], tmp_path,
                           capsys, monkeypatch)
        assert code == 2 and len(lines) == 1, (name, lines)
        assert lines[0].startswith(f"error: trainer.resume_from='{bad}': ") and message in lines[0], lines
    # a run whose best checkpoint holds NaN (downloaded from the store at preflight), by its id
    nan_best = tmp_path / "nan_best" / "best.pt"
    nan_best.parent.mkdir()
    state = torch.load(stored(store, mlp.run_id, "checkpoints/best.pt"), weights_only=True)
    next(iter(state["model"].values())).view(-1)[0] = float("nan")
    torch.save(state, nan_best)
    MlflowClient(store).log_artifact(mlp.run_id, str(nan_best), "checkpoints")
    code, lines = _cli([f"trainer.resume_from={mlp.run_id}", "model=mlp", "data=moons", "trainer.epochs=2",
                        f"tracking.uri={store}"], tmp_path, capsys, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    assert "(its best.pt): the checkpoint's" in lines[0] and "holds non-finite values" in lines[0]
    # a run id is checked once its checkpoint is downloaded, still before the run is touched
    res = run_train([f"trainer.resume_from={srn.run_id}", "model.hidden_size=64", f"tracking.uri={store}"], tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "the checkpoint is of another model (model=srn, data=digit_sum): " in lines[0]
    assert "is [32, 32] there and [32, 64] here" in lines[0]
    client, runs = _runs(store)
    assert sorted(r.info.run_id for r in runs) == sorted([mlp.run_id, srn.run_id])  # nothing created
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing flipped to RUNNING
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_a_job_that_fails_after_opening_its_run_closes_it(tmp_path, store, monkeypatch):
    """A failure between opening the run and training (injected: the trainer cannot be built) ends
    the run FAILED with the reason, never RUNNING; a resumed run is FAILED too, not left RUNNING."""
    import pytest

    import gradsweep.run.job as job
    from jobs import run_inprocess

    first = run_inprocess(["trainer.epochs=1"], tmp_path / "first", store)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job, "Trainer", broken)
    with pytest.raises(OSError):
        run_inprocess(["trainer.epochs=1"], tmp_path / "new", store)
    with pytest.raises(OSError):
        run_inprocess(["trainer.epochs=2", f"trainer.resume_from={first.run_id}"], tmp_path / "again", store)
    client, runs = _runs(store)
    # resuming the FINISHED run made a new run (FAILED); the original stays FINISHED
    assert len(runs) == 3 and [r.info.status for r in runs] == ["FINISHED", "FAILED", "FAILED"]
    for run in runs[1:]:
        assert run.data.tags["failure"] == "exception" and "No space left" in run.data.tags["failure_reason"]
