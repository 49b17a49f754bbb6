"""Where the training loop sends its records. The loop knows only :class:`Sink`.

Two kinds of record: a run's *step values* (every logged step: loss, accuracy, the norms, the clip
figures; names fixed once by :meth:`Sink.define_steps`, then float32 rows through
:meth:`Sink.log_steps`) and *sparse metrics* (evaluations, end-of-run figures: a dict per call).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Protocol, Union

import numpy as np

Series = tuple[Union[list, np.ndarray], Union[list, np.ndarray]]
#: NaN in these step values means "no value at this step" (an adaptive rule's warm-up; a regression's accuracy)
OPTIONAL_STEP_VALUES = ("clip/threshold", "clip/clipped_frac", "train/acc")


class Sink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        """The names of the columns of every later :meth:`log_steps` row; ``total_steps``: the
        run's planned length when known (0: not known)."""

    def log_steps(self, steps: np.ndarray, values: np.ndarray) -> None:
        """``steps``: (k,) int64; ``values``: (k, len(names)) float32, one row per step."""


class HistorySink:
    """Keeps every record in memory (figures, diagnostics): step values in one growing float32
    array (4 bytes a value, so a 100k-step run of a 150-tensor model holds 60 MB, not the GBs of a
    Python float per value), sparse metrics as lists.

    ``history[name] -> (steps, values)`` for both (numpy arrays for step values)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self._steps = np.empty(0, np.int64)
        self._values = np.empty((0, 0), np.float32)
        self.rows = 0
        self.sparse: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        if self.names == list(names):
            return  # a resumed run's history, continued
        if self.rows:
            raise ValueError("a history's step names are fixed once it holds steps")
        self.names, self.index = list(names), {n: i for i, n in enumerate(names)}
        cap = max(64, total_steps)
        self._steps, self._values = np.empty(cap, np.int64), np.empty((cap, len(names)), np.float32)

    def log_steps(self, steps: np.ndarray, values: np.ndarray) -> None:
        k = len(steps)
        if self.rows + k > len(self._steps):
            cap = max(2 * len(self._steps), self.rows + k)
            self._steps = np.resize(self._steps, cap)
            grown = np.empty((cap, len(self.names)), np.float32)
            grown[:self.rows] = self._values[:self.rows]
            self._values = grown
        self._steps[self.rows:self.rows + k] = steps
        self._values[self.rows:self.rows + k] = values
        self.rows += k

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            steps, values = self.sparse[name]
            steps.append(step)
            values.append(value)

    @property
    def steps(self) -> np.ndarray:
        return self._steps[:self.rows]

    def column(self, name: str) -> np.ndarray:
        return self._values[:self.rows, self.index[name]]

    @property
    def history(self) -> dict[str, Series]:
        """Every metric as ``name -> (steps, values)``: the step values (an optional one without
        its NaN steps) and the sparse metrics."""
        out: dict[str, Series] = {}
        steps = self.steps
        for name in self.names:
            values = self.column(name)
            if name in OPTIONAL_STEP_VALUES:
                keep = ~np.isnan(values)
                if not keep.any():
                    continue
                out[name] = (steps[keep], values[keep])
            else:
                out[name] = (steps, values)
        out.update((k, v) for k, v in self.sparse.items() if k not in out)
        return out

    def __bool__(self) -> bool:
        return bool(self.rows or self.sparse)


class NullSink:
    """Records nothing (the ranks of a data-parallel job other than rank 0)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        pass

    def log_steps(self, steps: np.ndarray, values: np.ndarray) -> None:
        pass


class TeeSink:
    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, metrics)

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        for sink in self.sinks:
            sink.define_steps(names, total_steps)

    def log_steps(self, steps: np.ndarray, values: np.ndarray) -> None:
        for sink in self.sinks:
            sink.log_steps(steps, values)


class FromStep:
    """Passes on, for each metric, only the steps after the last one the store already holds
    (a resumed run that was killed after its checkpoint: the re-run steps are not sent twice, and
    a step whose train metrics were logged but whose dev metrics were not still gets its dev ones).
    Step rows: those after the last step of the run's step values."""

    def __init__(self, sink: Sink, logged: dict[str, int]) -> None:
        self.sink, self.logged = sink, logged
        self.last_step = -1

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        new = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if new:
            self.sink.log_metrics(step, new)

    def define_steps(self, names: list[str], total_steps: int = 0) -> None:
        self.last_step = max((self.logged.get(n, -1) for n in names), default=-1)
        self.sink.define_steps(names, total_steps)

    def log_steps(self, steps: np.ndarray, values: np.ndarray) -> None:
        keep = steps > self.last_step
        if keep.all():
            self.sink.log_steps(steps, values)
        elif keep.any():
            self.sink.log_steps(steps[keep], values[keep])
