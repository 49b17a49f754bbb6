"""A job's inputs, checked and built before its run exists: the files its config names, the
checkpoint it resumes from, its data and model (a user's own checked on two examples), and their
memory estimate; bad input never leaves a run behind."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch

from gradsweep.names import RUN_ID
from gradsweep.run.resume import check_resume, resolve_resume, spool_for, tracker_for
from gradsweep.run.spec import JobSpec
from gradsweep.train import budget
from gradsweep.train.data import read_digit_sum
from gradsweep.train.registry import build
from gradsweep.train.user_code import check_task
from gradsweep.track.uri import check_local_store


def check_inputs(spec: JobSpec, claim: bool = True) -> None:
    """Files named by the config: the data folder, the embedded store and spool (writable), and the
    checkpoint to resume from (a file, or a run's last checkpoint) and whether it fits the model.
    ``claim``: this process is the one that will continue a run given by id (not a sweep's launcher)."""
    path = getattr(spec.data, "path", None)
    budget.check_data(spec.data, spec.trainer.memory_limit_gb)  # before reading a 3 GB file
    if path:
        read_digit_sum(path)
    if spec.tracking.backend == "mlflow":
        check_local_store(spec.tracking.uri, spec.tracking.spool_dir)
    ref = spec.trainer.resume_from
    if claim and ref and RUN_ID.match(ref) and not Path(ref).exists() and spec.tracking.backend == "mlflow":
        from gradsweep.track.ownership import claim_run

        spool = spool_for(spec)
        assert spool is not None  # backend mlflow: a spool folder
        claim_run(spool, ref)  # before reading the store: a run another live process resumes is not ours
    if not ref:
        if "custom" in (spec.model.name, spec.data.name):  # the user's code: imported and tried on two examples
            data_and_model(spec)
        else:  # the model's memory, estimated on the meta device: a bomb is refused before any folder exists
            check_model_budget(spec, _preflight_data(spec))
        return
    with tempfile.TemporaryDirectory(prefix="gradsweep-resume-") as tmp:
        resume = resolve_resume(ref, lambda: tracker_for(spec), Path(tmp), last_only=True)
    check_resume(spec, resume, *data_and_model(spec))


_DATA_SEEN: dict[str, object] = {}  # preflight: each distinct data config is built once per command


def _preflight_data(spec: JobSpec):
    key = repr(spec.data)
    if key not in _DATA_SEEN:
        _DATA_SEEN[key] = build("data", spec.data)
    return _DATA_SEEN[key]


def _model_maker(spec: JobSpec, data) -> Callable[[], torch.nn.Module]:
    return lambda: build("model", spec.model, data, 1 if spec.trainer.loss == "bce" else data.num_classes)


def check_model_budget(spec: JobSpec, data) -> None:
    budget.check_model(_model_maker(spec, data), spec.model, data.train.x, spec.trainer.batch_size or len(data.train),
                       getattr(spec.optimizer, "name", ""), spec.trainer.memory_limit_gb)


def data_and_model(spec: JobSpec) -> tuple:
    """The job's data and model; a model or data of the user's own is checked on two examples
    (its outputs must fit ``trainer.loss``) before anything is recorded. Neither is made when the
    config's estimate is past ``trainer.memory_limit_gb`` (:mod:`gradsweep.train.budget`)."""
    budget.check_data(spec.data, spec.trainer.memory_limit_gb)
    data = build("data", spec.data)
    check_model_budget(spec, data)
    model = _model_maker(spec, data)()
    if "custom" in (spec.model.name, spec.data.name):
        custom = spec.model if spec.model.name == "custom" else spec.data
        key = "model._target_" if custom is spec.model else "data._target_"
        # getattr: only the custom configs declare _target_, not the ModelConfig/DataConfig types
        check_task(model, data, spec.trainer.loss, key, getattr(custom, "_target_"))  # noqa: B009
    return data, model
