"""Step vectors: the dense per-step telemetry of a run, from the job's journal to the store.

A run's step values (loss, accuracy, the norms before and after clipping, the clip figures, every
parameter's norm) have names fixed when training starts (:class:`StepSchema`, ``steps.json`` in the
journal folder). Each logged step is then one fixed-size binary record in ``steps.bin``: the step
(int64), its wall time in ms (int64) and the values (float32): 4 bytes a value plus 16 a step,
where a JSON object per value took ~43.

Delivery turns the records into two things (:mod:`gradsweep.track.delivery`):

* the **dense history**: every record, as Parquet chunks of ``rows_per_chunk`` steps logged as
  run artifacts under ``telemetry/`` (read back with :func:`gradsweep.history`);
* **MLflow metrics, sampled**: a short run logs every step; a longer one is cut into windows of
  ``window`` steps, and each window sends, per metric, only its minimum and its maximum (at their
  true steps), so a spike keeps its exact value and step in MLflow's chart while the store grows
  with ``max_points``, not with the number of steps. MLflow's own UI never asks for more than
  2,500 points per metric and run (``MAX_RESULTS_PER_RUN`` in ``mlflow/server/handlers.py``).

Both are cut at fixed positions (chunk ``k`` = records ``k*rows_per_chunk...``; window ``w`` =
steps ``w*window...``), so a delivery retried after an outage or a crash sends the same chunk
under the same name and the same points again: nothing is lost and nothing is stored twice.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from gradsweep.locks import temporary_name
from gradsweep.names import CLIP_CLIPPED_FRAC, CLIP_THRESHOLD, GRAD_NORM, GRAD_TOTAL, GRAD_TOTAL_CLIPPED, TRAIN_ACC

SCHEMA = "steps.json"
STEPS = "steps.bin"
TELEMETRY = "telemetry"  #: artifact folder of the dense history
HEAD = 16  #: bytes of a record before its values: step and wall time, int64 each
CHUNK_VALUES = 1 << 20  #: about this many values per Parquet chunk (4 MB of float32)
#: NaN in these means "no value at this step" (an adaptive rule's warm-up; no accuracy in a regression),
#: not a diverged run: not sent to MLflow
OPTIONAL = (CLIP_THRESHOLD, CLIP_CLIPPED_FRAC, TRAIN_ACC)


def record_dtype(n: int) -> np.dtype:
    return np.dtype([("step", "<i8"), ("ts", "<i8"), ("v", "<f4", (n,))])


def is_param_metric(name: str) -> bool:
    return name.startswith(GRAD_NORM) and name not in (GRAD_TOTAL, GRAD_TOTAL_CLIPPED)


@dataclass
class StepSchema:
    """What a run's step records hold and how they are delivered (``steps.json``)."""

    names: list[str]
    total_steps: int = 0  #: steps planned (0: not known, e.g. a loop of the user's own)
    max_points: int = 2500  #: per metric and run in MLflow: loss, accuracy, totals, clip figures
    max_param_points: int = 250  #: per parameter metric (grad_norm/<param>) and run
    rows_per_chunk: int = 0  #: steps per Parquet chunk; 0 = from CHUNK_VALUES
    start_ms: int = 0  #: when the journal was opened: orders the chunks of a resumed run's journals
    param_groups: str = "tensor"  #: how parameter norms are grouped in MLflow (see group_of)
    windows: dict[str, int] = field(default_factory=dict)  #: steps per window of each family (__post_init__)

    def __post_init__(self) -> None:
        if not self.rows_per_chunk:
            self.rows_per_chunk = max(256, CHUNK_VALUES // max(1, len(self.names)))
        self.windows = {"head": window(self.total_steps, self.max_points),
                        "param": window(self.total_steps, self.max_param_points)}

    def window_ids(self, family: str, steps: np.ndarray) -> np.ndarray:
        budget = self.max_param_points if family == "param" else self.max_points
        return window_ids(steps, self.total_steps, budget)

    @property
    def width(self) -> int:
        return HEAD + 4 * len(self.names)

    def window_of(self, name: str) -> int:
        return self.windows["param" if is_param_metric(name) else "head"]

    def save(self, folder: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "windows"}
        tmp = temporary_name(folder / SCHEMA)
        tmp.write_text(json.dumps(data))
        tmp.replace(folder / SCHEMA)

    @classmethod
    def load(cls, folder: Path) -> Optional["StepSchema"]:
        try:
            data = json.loads((folder / SCHEMA).read_text())
        except (OSError, ValueError):
            return None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "windows"})


def window(total_steps: int, max_points: int) -> int:
    """Steps per window so that min and max of each window fit ``max_points`` (1: every step); for
    a run of unknown length (0), the width of its first windows (see :func:`window_ids`)."""
    if total_steps <= max_points:
        return 1
    return math.ceil(total_steps / max(1, max_points // 2))


LEVELS = 20  #: a run of unknown length: window widths 1, 2, 4, ... 2**19, each for the same number of windows


def window_ids(steps: np.ndarray, total_steps: int, max_points: int) -> np.ndarray:
    """The window of each step. Known length: windows of :func:`window` steps. Unknown length (a
    loop of the user's own): ``c = max_points / (2 * LEVELS)`` windows of 1 step, then c of 2, c of
    4, ...: the bound holds for runs up to ``c * (2**LEVELS - 1)`` steps (65 M at 2,500 points), and
    the early steps, all a short run has, keep a fine resolution."""
    steps = np.asarray(steps, dtype=np.int64)
    if total_steps > 0:
        return steps // window(total_steps, max_points)
    c = max(1, max_points // (2 * LEVELS))
    level = np.floor(np.log2(steps // c + 1)).astype(np.int64)
    width = np.left_shift(1, level)
    return level * c + (steps - c * (width - 1)) // width


def read_records(folder: Path, schema: StepSchema, offset: int, max_rows: Optional[int] = None) -> np.ndarray:
    """Complete records of ``steps.bin`` from byte ``offset`` (a torn tail after a crash is left out)."""
    dtype = record_dtype(len(schema.names))
    try:
        with open(folder / STEPS, "rb") as f:
            f.seek(offset)
            data = f.read() if max_rows is None else f.read(max_rows * dtype.itemsize)
    except FileNotFoundError:
        return np.empty(0, dtype)
    usable = len(data) - len(data) % dtype.itemsize
    return np.frombuffer(data[:usable], dtype)


FAMILIES = ("head", "param")  #: headline metrics; parameter norms (each with its own window and offset)


def sample(records: np.ndarray, schema: StepSchema, final: bool,
           family: str = "head") -> tuple[list[tuple[str, int, int, float]], int]:
    """The MLflow points of one family's metrics in ``records`` (which start at one of its window
    boundaries, or at the run's first record): ``(name, step, ts, value)`` of every complete window,
    and of the last, partial one when ``final``; and how many records those windows used (the
    family's next pass starts there)."""
    cols = [j for j, n in enumerate(schema.names) if (family == "param") == is_param_metric(n)]
    if len(records) == 0 or not cols:
        return [], len(records)
    ids = schema.window_ids(family, records["step"])
    used = len(records)
    last = int(records["step"][-1])
    if not final and schema.window_ids(family, np.array([last + 1]))[0] == ids[-1]:  # the latest window may still grow
        used = int(np.searchsorted(ids, ids[-1], side="left"))
    every_step = schema.total_steps > 0 and schema.windows[family] == 1
    recs = records[:used]
    if family == "param" and schema.param_groups != "tensor":
        names, values = group_norms(recs["v"], schema)
    else:
        names, values = [schema.names[j] for j in cols], recs["v"][:, cols]
    return _window_points(recs["step"], recs["ts"], values, names, None if every_step else ids[:used]), used


def group_of(param: str, spec: str) -> str:
    """The group a parameter's norm belongs to in MLflow (``tracking.param_groups``): ``tensor``:
    itself; ``module``: its module (``blocks.0.attn.weight`` -> ``blocks.0.attn``); ``depth:N``: the
    first N parts of its name (``depth:2``: ``blocks.0``); ``re:<pattern>``: the pattern's first
    group (or whole match) where it matches, else itself."""
    if spec == "tensor":
        return param
    if spec == "module":
        return param.rpartition(".")[0] or param
    if spec.startswith("depth:"):
        return ".".join(param.split(".")[:int(spec[6:])])
    m = re.search(spec[3:], param)
    group = None if m is None else (m.group(1) if m.groups() and m.group(1) else m.group(0))
    return group or param  # an empty match names no group


def check_param_groups(spec: str) -> Optional[str]:
    """Why ``spec`` is not a valid ``tracking.param_groups`` (None when it is)."""
    if spec in ("tensor", "module"):
        return None
    if spec.startswith("depth:"):
        n = spec[6:]
        return None if n.isascii() and n.isdigit() and int(n) >= 1 else "depth:N needs an integer N >= 1"
    if spec.startswith("re:"):
        try:
            re.compile(spec[3:])
        except re.error as e:
            return f"re: {e}"
        return None
    return "unknown form"


def group_norms(values: np.ndarray, schema: StepSchema) -> tuple[list[str], np.ndarray]:
    """Each group's norm per row: sqrt of the sum of its tensors' squared norms (the L2 norm of
    the group's gradients as one vector)."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(schema.names):
        if is_param_metric(name):
            groups.setdefault(GRAD_NORM + group_of(name[len(GRAD_NORM):], schema.param_groups), []).append(j)
    v = values.astype(np.float64)
    return list(groups), np.stack([np.sqrt((v[:, idx] ** 2).sum(axis=1)) for idx in groups.values()], axis=1)


def _window_points(steps: np.ndarray, ts: np.ndarray, values: np.ndarray, names: list[str],
                   ids: Optional[np.ndarray]) -> list[tuple[str, int, int, float]]:
    """Each window's min and max per name (``ids``: the window of each row; None: every row)."""
    if len(steps) == 0:
        return []
    out: list[tuple[str, int, int, float]] = []
    if ids is None:
        for i in range(len(steps)):
            s, t = int(steps[i]), int(ts[i])
            for name, v in zip(names, values[i].tolist(), strict=True):
                if not (math.isnan(v) and name in OPTIONAL):
                    out.append((name, s, t, v))
        return out
    bounds = np.flatnonzero(np.diff(ids)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(steps)], strict=True):
        block = values[a:b].astype(np.float64)
        finite = np.isfinite(block)
        lo = np.where(finite, block, np.inf).argmin(axis=0)
        hi = np.where(finite, block, -np.inf).argmax(axis=0)
        bad = (~finite).argmax(axis=0)  # first non-finite row, where there is one
        has_finite, has_bad = np.asarray(finite.any(axis=0)), np.asarray(~finite.all(axis=0))
        for j, name in enumerate(names):
            rows: set[int] = set()
            if has_finite[j]:
                rows.update((int(lo[j]), int(hi[j])))
            if has_bad[j] and name not in OPTIONAL:  # a diverged value is shown, not hidden by sampling
                rows.add(int(bad[j]))
            for r in sorted(rows):
                out.append((name, int(steps[a + r]), int(ts[a + r]), float(block[r, j])))
    return out


def chunk_name(schema: StepSchema, first_step: int) -> str:
    """Deterministic: a retried upload replaces the same file. Sorted by name = written order."""
    return f"steps-{schema.start_ms:013d}-{first_step:010d}.parquet"


def write_chunk(records: np.ndarray, schema: StepSchema, path: Path) -> Path:
    """One Parquet file: ``step``, ``time`` (ms) and one float32 column per metric name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"step": pa.array(records["step"]), "time": pa.array(records["ts"])}
    values = np.ascontiguousarray(records["v"])
    for j, name in enumerate(schema.names):
        columns[name] = pa.array(values[:, j])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    pq.write_table(pa.table(columns), tmp, compression="zstd")
    tmp.replace(path)
    return path
