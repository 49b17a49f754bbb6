"""The body of rank 1..N-1 of a data-parallel job, wherever the rank comes from
(:mod:`gradsweep.run.ranks`): the job's model, data, optimizer and clipping rule built from its
validated config, the same resume checkpoint as rank 0, its share of every step, no records.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from gradsweep.run.ranks import RESUME, Tasks, exit_with_parent, failed, ready
from gradsweep.train.parallel import DataParallel

if TYPE_CHECKING:
    from gradsweep.run.spec import JobSpec

COLLECTIVE_TIMEOUT_MIN = 30  # rank 0 may evaluate a large dev set while the others wait


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: ``cuda:<local rank>`` (modulo the GPUs this process sees: one each where the
    scheduler gives every task its own), else the job's device."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def rendezvous(folder: Path) -> str:
    return f"file://{folder.resolve() / 'rendezvous'}"


def spawned_rank(index: int, world: int, folder: str, spec: "JobSpec") -> None:
    """Rank ``index + 1`` of a ``trainer.devices=N`` job (torch.multiprocessing's target)."""
    rank = index + 1
    run_rank(spec, rank, world, rank, Path(folder), exit_with_parent)


def task_rank(spec: "JobSpec", tasks: Tasks) -> None:
    """This task, rank > 0 of a job run by several tasks: only its warnings and errors reach the
    handlers it shares with rank 0 (Hydra's job log file), its own libraries' (submitit's) included."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    tasks.folder.mkdir(parents=True, exist_ok=True)
    run_rank(spec, tasks.rank, tasks.world, tasks.local_rank, tasks.folder, tasks.watch)


def run_rank(spec: "JobSpec", rank: int, world: int, local_rank: int, folder: Path,
             watch: Callable[[threading.Event], None]) -> None:
    """Build, say ready, join rank 0, restore, train; ``watch`` (a thread until training is over)
    ends this process when rank 0's job is over without it."""
    done = threading.Event()
    threading.Thread(target=watch, args=(done,), daemon=True).start()
    try:
        from datetime import timedelta

        from gradsweep.run.inputs import data_and_model
        from gradsweep.run.job import device_for
        from gradsweep.train.checkpoints import load_checkpoint
        from gradsweep.train.loop import Trainer
        from gradsweep.train.registry import build
        from gradsweep.train.sinks import NullSink

        if spec.trainer.cpu_threads:
            torch.set_num_threads(spec.trainer.cpu_threads)
        torch.manual_seed(spec.trainer.seed)
        data, model = data_and_model(spec)
        device = rank_device(device_for(spec.trainer.device), local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model.to(device)
        optimizer = build("optimizer", spec.optimizer, model.parameters())
        clipper = build("clip", spec.clip)
    except BaseException as e:
        failed(folder, rank, e)
        raise
    ready(folder, rank)
    try:
        dist.init_process_group(backend_for(device), init_method=rendezvous(folder), rank=rank, world_size=world,
                                timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
        state = load_checkpoint(folder / RESUME) if spec.trainer.resume_from else None  # written before rank 0 joined
        trainer = Trainer(model, data, optimizer, clipper, spec.trainer, NullSink(), device,
                          parallel=DataParallel(rank, world))
        if state is not None:
            trainer.restore(state)
        trainer.run()
    except BaseException as e:
        failed(folder, rank, e)
        raise
    finally:
        done.set()
    dist.destroy_process_group()
