"""Memory a job will need, estimated from its config before anything large is allocated.

``model.hidden_size=100000000`` or ``data.train_copies=100000000`` once failed in the allocator
after seconds of work and gigabytes of memory. The job now refuses such a config in one line naming
the key, before the data or the model exist:

* the data: what the built-in generators make from their config (``data.*`` sizes), or the size of
  the files ``data.path`` names (a text file of digits becomes ~4x its size in int64 tensors);
* the model: built on PyTorch's ``meta`` device (shapes only, no storage), its parameters x
  (weights, gradients and optimizer state) plus the activations of one training batch, measured by
  a forward pass on the meta device with hooks on every leaf module (kept for backward: x2).

The limit is ``trainer.memory_limit_gb`` (0 = 80 % of this machine's memory, or of the cgroup's limit
when the job runs in a container). An estimate is a lower bound of what PyTorch will use, so the
refusal is certain, not a guess; a model of the user's own that cannot run on ``meta`` is not estimated.
"""
from __future__ import annotations

import logging
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from gradsweep.errors import ConfigError

log = logging.getLogger("gradsweep")
GB = 1024 ** 3
TEXT_TO_TENSOR = 4  #: bytes in memory per byte of a digit-sum text file (one int64 per digit and separator pair)
#: optimizer state per parameter, in parameter-sized tensors (Adam keeps two moments, momentum SGD one)
OPTIMIZER_STATE = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 2}


def machine_memory() -> int:
    """Bytes of memory this process may use: the cgroup's limit when one is set, else physical memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def limit_bytes(limit_gb: float) -> int:
    return int(limit_gb * GB) if limit_gb > 0 else int(0.8 * machine_memory())


def _sizes(cfg: Any) -> str:
    """The config's integer keys (what makes it large), for the message."""
    if not is_dataclass(cfg):
        return ""
    ints = [f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)
            if isinstance(getattr(cfg, f.name), int) and not isinstance(getattr(cfg, f.name), bool)
            and f.name != "seed"]
    return ", ".join(ints)


def _refuse(what: str, group: str, cfg: Any, need: int, limit: int, limit_gb: float) -> None:
    if need > limit:
        sizes = _sizes(cfg)
        raise ConfigError(f"{group}{' (' + sizes + ')' if sizes else ''}: {what} needs about {need / GB:.3g} GB, "
                          f"past the limit of {limit / GB:.3g} GB; allowed: a smaller {group} config, or a larger "
                          f"trainer.memory_limit_gb (now {limit_gb:g}"
                          f"{' = 80% of this machine' if not limit_gb else ''})")


def data_bytes(cfg: Any) -> Optional[int]:
    """Bytes the data config will take in memory, or None where it cannot be told before loading."""
    name = getattr(cfg, "name", None)
    if name == "digit_sum":
        if cfg.path:
            folder = Path(cfg.path)
            files = [folder / f"{s}.txt" for s in ("train", "dev", "test")]
            return sum(f.stat().st_size for f in files if f.is_file()) * TEXT_TO_TENSOR
        rows = 100 * (cfg.train_copies + cfg.dev_copies + cfg.test_copies)
        return rows * (cfg.length + 1) * 8 * 2  # int64, numpy then torch
    if name in ("moons", "circles"):
        return cfg.n_samples * 3 * 8 * 2
    return None


def check_data(cfg: Any, limit_gb: float) -> None:
    need = data_bytes(cfg)
    if need is not None:
        _refuse("its data", "data", cfg, need, limit_bytes(limit_gb), limit_gb)


def model_bytes(build_model, example: torch.Tensor, batch: int, optimizer: str) -> Optional[tuple[int, int]]:
    """(parameter bytes with gradients and optimizer state, activation bytes of one batch) of the
    model ``build_model()`` makes, built and run on the meta device; None if it cannot run there."""
    try:
        with torch.device("meta"):
            model = build_model()
    except Exception as e:  # a user's model that needs real storage to be built: not estimated
        log.debug("memory estimate skipped: the model cannot be built on the meta device (%s)", e)
        return None
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params *= 2 + OPTIMIZER_STATE.get(optimizer, 2)
    acts = [0]

    def count(_module, _inputs, output) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                acts[0] += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty((batch, *example.shape[1:]), dtype=example.dtype, device="meta"))
    except Exception as e:  # shapes the meta device cannot follow (data-dependent control flow)
        log.debug("activation estimate skipped: %s", e)
        acts[0] = 0
    finally:
        for h in hooks:
            h.remove()
    return params, 2 * acts[0]


def check_model(build_model, model_cfg: Any, example: torch.Tensor, batch: int, optimizer: str,
                limit_gb: float) -> None:
    sizes = model_bytes(build_model, example, batch, optimizer)
    if sizes is not None:
        _refuse("training it (parameters, gradients, optimizer state and one batch's activations)", "model",
                model_cfg, sum(sizes), limit_bytes(limit_gb), limit_gb)
