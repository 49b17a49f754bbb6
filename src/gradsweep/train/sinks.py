"""Where the training loop sends its records. The loop knows only :class:`Sink`."""
from __future__ import annotations

from collections import defaultdict
from typing import Protocol


class Sink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...


class HistorySink:
    """Keeps every record in memory: ``history[name] -> ([steps], [values])`` (figures, diagnostics)."""

    def __init__(self) -> None:
        self.history: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            steps, values = self.history[name]
            steps.append(step)
            values.append(value)


class TeeSink:
    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log_metrics(step, metrics)


class FromStep:
    """Passes on, for each metric, only the steps after the last one the store already holds
    (a resumed run that was killed after its checkpoint: the re-run steps are not sent twice, and
    a step whose train metrics were logged but whose dev metrics were not still gets its dev ones)."""

    def __init__(self, sink: Sink, logged: dict[str, int]) -> None:
        self.sink, self.logged = sink, logged

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        new = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        if new:
            self.sink.log_metrics(step, new)
