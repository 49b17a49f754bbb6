"""The typed, validated form of one job: what the Hydra adapter hands to :func:`gradsweep.run.job.run_job`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradsweep.checks import require
from gradsweep.names import RUN_ID
from gradsweep.train.clipping import ClipConfig
from gradsweep.train.data import DataConfig
from gradsweep.train.diagnostics import DiagnosticsConfig
from gradsweep.train.loop import TrainerConfig
from gradsweep.train.models import ModelConfig
from gradsweep.train.optim import OptimizerConfig
from gradsweep.train.registry import parts
from gradsweep.track.settings import TrackingConfig
from gradsweep.track.uri import mask


@dataclass
class JobSpec:
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    clip: ClipConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        """Checks across groups (each group's own keys were checked by its schema)."""
        allowed = parts("model")[self.model.name].data
        require(self.data.name in allowed, "data", self.data.name, f"{'|'.join(allowed)} for model={self.model.name}")
        ref = self.trainer.resume_from
        if ref and RUN_ID.match(ref) and not Path(ref).exists():
            require(self.tracking.backend == "mlflow", "tracking.backend", self.tracking.backend,
                    f"mlflow to resume from the run id trainer.resume_from={ref} (memory records no runs)")
        if self.trainer.loss == "bce":
            require(self.data.name in ("moons", "circles", "custom"), "trainer.loss", "bce",
                    "cross_entropy for data with more than 2 classes")
        if self.trainer.loss in ("mse", "lm"):
            require(self.model.name == "custom" and self.data.name == "custom", "trainer.loss", self.trainer.loss,
                    "cross_entropy|bce for the built-in models and data (mse and lm: model=custom data=custom)")

    def public(self) -> dict[str, Any]:
        """The whole config as plain data with the password of every URI masked: what the run's
        params, its config artifact and its checkpoints hold."""
        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: walk(v) for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return [walk(v) for v in node]
            return mask(node) if isinstance(node, str) and "://" in node else node

        return walk(asdict(self))

    def params(self) -> dict[str, Any]:
        """:meth:`public`, flattened to ``group.key`` names: the run's params."""
        return flatten(self.public())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
