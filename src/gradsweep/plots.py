"""Figures (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = tuple[list[int], list[float]]


def _positive(series: Series) -> Series:
    """Log axes cannot show zeros: drop non-positive and non-finite points."""
    pts = [(s, v) for s, v in zip(*series) if v > 0 and v == v and v != float("inf")]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_lines(series: dict[str, Series], path: str | Path, title: str, ylabel: str, log_y: bool = True) -> Path:
    """One line per series against the optimizer step."""
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    for label, s in series.items():
        steps, values = _positive(s) if log_y else s
        ax.plot(steps, values, label=label, linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8, ncol=2 if len(series) > 8 else 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_param_norms(history: dict[str, Series], path: str | Path, title: str = "") -> Path:
    """Per-parameter gradient L2 norms vs step, plus the total before and after clipping."""
    series = {k.removeprefix("grad_norm/"): v for k, v in history.items() if k.startswith("grad_norm/")}
    return plot_lines(series, path, title or "gradient norms", "gradient L2 norm")
