"""Typed schema of every config group.

Each dataclass documents its hyperparameters where they are declared. They are registered in
Hydra's ConfigStore as ``<group>/<name>_schema`` and used as the first entry of each group YAML's
defaults list, so Hydra rejects unknown keys and wrong types at composition time. Range checks
(``lr > 0``, ``max_norm > 0``, ...) live in ``__post_init__`` and run when :func:`to_objects`
turns the composed config into these dataclasses, before any run is created.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from gradsweep.errors import ConfigError

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu")
WEIGHT_INITS = ("normal", "uniform", "zeros", "xavier", "kaiming")
SRN_INITS = ("zeros", "normal", "uniform", "xavier")
REDUCTIONS = ("sum", "mean")
LOSSES = ("cross_entropy", "bce")
NORM_TYPES = (1.0, 2.0, math.inf)
DEVICES = ("auto", "cpu", "cuda")


def _require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, key, value, "|".join(str(a) for a in allowed))


def _positive(key: str, value: float, strict: bool = True) -> None:
    ok = value > 0 if strict else value >= 0
    _require(ok and math.isfinite(value), key, value, "a finite number " + ("> 0" if strict else ">= 0"))


# ----------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    #: depth: SRN/LSTM/GRU stacked recurrent layers, MLP hidden layers, CNN conv layers
    num_layers: int = 1

    def __post_init__(self) -> None:
        _require(self.num_layers >= 1, "model.num_layers", self.num_layers, "an integer >= 1")


@dataclass
class SRNConfig(ModelConfig):
    """Simple recurrent network: h_t = tanh(x_t W + h_{t-1} U + b)."""

    name: str = "srn"
    input_size: int = 32  # embedding size of the 10 digits
    hidden_size: int = 32
    init: str = "zeros"  # init of W, U, b: zeros|normal|uniform|xavier
    init_std: float = 0.01  # std for init=normal, bound for init=uniform

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.input_size >= 1, "model.input_size", self.input_size, "an integer >= 1")
        _require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")
        _choice("model.init", self.init, SRN_INITS)


@dataclass
class RNNConfig(ModelConfig):
    """torch.nn.LSTM / torch.nn.GRU over embedded digits."""

    name: str = "lstm"
    input_size: int = 32
    hidden_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("model.name", self.name, ("lstm", "gru"))
        _require(self.input_size >= 1, "model.input_size", self.input_size, "an integer >= 1")
        _require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")


@dataclass
class MLPConfig(ModelConfig):
    """num_layers hidden layers of hidden_size units, then a linear output layer."""

    name: str = "mlp"
    num_layers: int = 2
    hidden_size: int = 16
    activation: str = "relu"  # sigmoid|tanh|relu|leaky_relu|elu
    weight_init: str = "xavier"  # normal|uniform|zeros|xavier|kaiming
    weight_mean: float = 0.0  # init=normal: mean
    weight_std: float = 0.01  # init=normal: std; init=uniform: bound a of U(-a, a)
    bias_init: float = 0.0  # every bias is set to this constant
    #: widths of the hidden layers, e.g. [5, 3]; when set it replaces num_layers x hidden_size
    hidden_sizes: Optional[list[int]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")
        if self.hidden_sizes is not None:
            _require(len(self.hidden_sizes) >= 1 and min(self.hidden_sizes) >= 1, "model.hidden_sizes",
                     list(self.hidden_sizes), "null or a non-empty list of integers >= 1")
        _choice("model.activation", self.activation, ACTIVATIONS)
        _choice("model.weight_init", self.weight_init, WEIGHT_INITS)
        _positive("model.weight_std", self.weight_std, strict=False)


@dataclass
class CNNConfig(ModelConfig):
    """num_layers 3x3 conv layers of `channels` channels, then a linear classifier."""

    name: str = "cnn"
    num_layers: int = 2
    channels: int = 16
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.channels >= 1, "model.channels", self.channels, "an integer >= 1")
        _choice("model.activation", self.activation, ACTIVATIONS)


# ------------------------------------------------------------------------------------ data
@dataclass
class DataConfig:
    name: str = MISSING
    seed: int = 0  # data generation / split seed (independent of trainer.seed)


@dataclass
class DigitSumConfig(DataConfig):
    """Sequences [n1, n2, noise...], label n1 + n2 (19 classes)."""

    name: str = "digit_sum"
    length: int = 20
    train_copies: int = 3  # k: copies of each of the 100 base sequences
    dev_copies: int = 1
    test_copies: int = 1
    path: Optional[str] = None  # folder with train.txt/dev.txt/test.txt instead of generating

    def __post_init__(self) -> None:
        _require(self.length >= 3, "data.length", self.length, "an integer >= 3")
        for k in ("train_copies", "dev_copies", "test_copies"):
            _require(getattr(self, k) >= 1, f"data.{k}", getattr(self, k), "an integer >= 1")


@dataclass
class ToyConfig(DataConfig):
    """scikit-learn make_moons / make_circles."""

    name: str = "moons"
    n_samples: int = 1000
    noise: float = 0.1
    factor: float = 0.5  # circles only: inner/outer radius ratio
    split: list[int] = field(default_factory=lambda: [640, 160, 200])  # train/dev/test

    def __post_init__(self) -> None:
        _choice("data.name", self.name, ("moons", "circles"))
        _positive("data.noise", self.noise, strict=False)
        _require(len(self.split) == 3 and sum(self.split) == self.n_samples and min(self.split) > 0,
                 "data.split", list(self.split), f"three positive sizes summing to data.n_samples={self.n_samples}")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn load_digits: 1797 8x8 images shipped with the package."""

    name: str = "digits"
    dev_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        ok = 0 < self.dev_fraction < 1 and 0 < self.test_fraction < 1 and self.dev_fraction + self.test_fraction < 1
        _require(ok, "data.dev_fraction+test_fraction", (self.dev_fraction, self.test_fraction),
                 "fractions in (0, 1) with a sum < 1")


# ------------------------------------------------------------------------------- optimizer
@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 0.1
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.weight_decay", self.weight_decay, strict=False)


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "a number in [0, 1)")


@dataclass
class AdamConfig(OptimizerConfig):
    """Adam or AdamW (name selects)."""

    name: str = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("optimizer.name", self.name, ("adam", "adamw"))
        for k in ("beta1", "beta2"):
            _require(0 <= getattr(self, k) < 1, f"optimizer.{k}", getattr(self, k), "a number in [0, 1)")
        _positive("optimizer.eps", self.eps)


@dataclass
class RMSpropConfig(OptimizerConfig):
    name: str = "rmsprop"
    lr: float = 1e-3
    alpha: float = 0.9  # smoothing constant; Keras default 0.9, torch default 0.99
    eps: float = 1e-7  # Keras default
    momentum: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 < self.alpha < 1, "optimizer.alpha", self.alpha, "a number in (0, 1)")
        _positive("optimizer.eps", self.eps)


# ------------------------------------------------------------------------------------ clip
@dataclass
class ClipConfig:
    """none: log only; norm: rescale so the global norm <= max_norm; value: clamp each element."""

    name: str = "none"
    max_norm: Optional[float] = None
    norm_type: float = 2.0  # 1|2|inf: norm used to decide the clip (telemetry is always L2)
    clip_value: Optional[float] = None

    def __post_init__(self) -> None:
        _choice("clip.name", self.name, ("none", "norm", "value"))
        # a value given is checked even where this mode ignores it: a typo must not pass silently
        if self.name == "norm" or self.max_norm is not None:
            _require(self.max_norm is not None and self.max_norm > 0 and math.isfinite(self.max_norm),
                     "clip.max_norm", self.max_norm, "a finite number > 0")
        _choice("clip.norm_type", self.norm_type, NORM_TYPES)
        if self.name == "value" or self.clip_value is not None:
            _require(self.clip_value is not None and self.clip_value > 0 and math.isfinite(self.clip_value),
                     "clip.clip_value", self.clip_value, "a finite number > 0")


# --------------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    epochs: int = 50
    batch_size: int = 64  # 0 = full batch
    loss: str = "cross_entropy"  # cross_entropy|bce (bce: binary data, one output unit)
    reduction: str = "sum"  # sum|mean
    eval_every_steps: int = 100  # also evaluated after the last step
    log_every_steps: int = 1
    checkpoint_every_steps: int = 0  # 0 = only best (at evaluations) and last
    seed: int = 0
    device: str = "auto"  # auto|cpu|cuda
    #: torch CPU threads of the job. 1 by default: this product's models are small, their ops do
    #: not scale across threads, and a sweep runs several jobs beside a delivery process, where
    #: more threads than cores made the first steps up to 10x slower. 0 = torch's default (all cores).
    cpu_threads: int = 1
    resume_from: Optional[str] = None  # checkpoint path or MLflow run id
    #: at the last step of each epoch also log weight_mean/<param>, weight_std/<param> (after the
    #: update) and grad_mean/<param>, grad_std/<param> (that step's gradient, before clipping)
    epoch_stats: bool = False

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "trainer.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 0, "trainer.batch_size", self.batch_size, "an integer >= 0 (0 = full batch)")
        _choice("trainer.loss", self.loss, LOSSES)
        _choice("trainer.reduction", self.reduction, REDUCTIONS)
        _require(self.eval_every_steps >= 1, "trainer.eval_every_steps", self.eval_every_steps, "an integer >= 1")
        _require(self.log_every_steps >= 1, "trainer.log_every_steps", self.log_every_steps, "an integer >= 1")
        _require(self.checkpoint_every_steps >= 0, "trainer.checkpoint_every_steps",
                 self.checkpoint_every_steps, "an integer >= 0")
        _choice("trainer.device", self.device, DEVICES)
        _require(self.cpu_threads >= 0, "trainer.cpu_threads", self.cpu_threads,
                 "an integer >= 0 (0 = torch's default)")


# ----------------------------------------------------------------------------- diagnostics
@dataclass
class DiagnosticsConfig:
    """Thresholds of the end-of-run gradient-health verdict (:mod:`gradsweep.diagnostics`).

    The verdict is the tag ``grad_health``: ``ok``, or a comma list of ``exploding``,
    ``vanishing``, ``dead_units``, ``nonfinite``.
    """

    enabled: bool = True
    #: a spike is a step whose total gradient norm (before clipping) exceeds spike_factor x the
    #: median total norm of the previous spike_window steps; counted from step spike_min_history
    spike_factor: float = 10.0
    spike_window: int = 50
    spike_min_history: int = 5
    exploding_spikes: int = 1  # exploding when spike_count >= this
    #: a parameter's gradient has vanished on a step when its norm is below vanish_abs, or below
    #: both vanish_rel_peak x its own peak so far and vanish_rel_total x that step's total norm
    #: (it collapsed while other parameters still get gradient)
    vanish_abs: float = 1e-12
    vanish_rel_peak: float = 1e-4
    vanish_rel_total: float = 1e-3
    vanishing_frac: float = 0.5  # vanishing when some parameter vanished on >= this fraction of steps
    #: layered models (MLP layers.i, CNN convs.i + classifier): median over the first ratio_steps
    #: steps of |grad first-layer weight| / |grad last-layer weight|; vanishing when below the minimum
    ratio_steps: int = 10
    first_last_ratio_min: float = 1e-7
    #: ReLU MLPs: dead_units when >= this fraction of hidden units output 0 on every training example
    dead_frac: float = 0.5

    def __post_init__(self) -> None:
        _require(self.spike_factor > 1, "diagnostics.spike_factor", self.spike_factor, "a number > 1")
        for k in ("spike_window", "spike_min_history", "exploding_spikes", "ratio_steps"):
            _require(getattr(self, k) >= 1, f"diagnostics.{k}", getattr(self, k), "an integer >= 1")
        for k in ("vanish_abs", "vanish_rel_peak", "vanish_rel_total", "first_last_ratio_min"):
            _positive(f"diagnostics.{k}", getattr(self, k), strict=False)
        for k in ("vanishing_frac", "dead_frac"):
            _require(0 < getattr(self, k) <= 1, f"diagnostics.{k}", getattr(self, k), "a number in (0, 1]")


# -------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlruns/mlflow.db"  # or http://host:port; MLFLOW_TRACKING_URI wins if set
    experiment_name: str = "gradsweep"
    artifact_location: Optional[str] = None  # embedded store: defaults to mlruns/artifacts
    spool_dir: Optional[str] = None  # run journals before delivery; default: mlruns/spool
    delivery_timeout_s: float = 60.0  # at the end of a run, wait this long for an unreachable store
    log_figures: bool = True
    log_checkpoints: bool = True

    def __post_init__(self) -> None:
        from gradsweep.tracking_uri import check_tracking_uri

        check_tracking_uri(self.uri)
        _require(bool(self.experiment_name.strip()), "tracking.experiment_name", self.experiment_name, "a non-empty name")
        _positive("tracking.delivery_timeout_s", self.delivery_timeout_s, strict=False)


@dataclass
class GradsweepConfig:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    clip: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # a sweep file's {cron, timezone, trials_per_run}: read by `gradsweep schedule`, ignored by jobs
    schedule: Optional[Any] = None


@dataclass
class JobSpec:
    """The validated, typed form of one job's config."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    clip: ClipConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"srn": SRNConfig, "lstm": RNNConfig, "gru": RNNConfig, "mlp": MLPConfig, "cnn": CNNConfig},
    "data": {"digit_sum": DigitSumConfig, "moons": ToyConfig, "circles": ToyConfig, "digits": DigitsConfig},
    "optimizer": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig, "rmsprop": RMSpropConfig},
    "clip": {"none": ClipConfig, "norm": ClipConfig, "value": ClipConfig},
}
COMPATIBLE_DATA = {
    "srn": ("digit_sum",), "lstm": ("digit_sum",), "gru": ("digit_sum",),
    "mlp": ("moons", "circles", "digits"), "cnn": ("digits",),
}


def register_schemas() -> None:
    """Store the schemas so group YAMLs can name ``<name>_schema`` in their defaults list."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    # replace=True: registering again (a second compose in one process) is the same content, not a collision
    cs.store(name="gradsweep_schema", node=GradsweepConfig, replace=True)
    for group, table in SCHEMAS.items():
        for name, schema in table.items():
            # structured(class) does not run __post_init__, so defaults need not be valid yet
            node = OmegaConf.structured(schema)
            node.name = name
            cs.store(group=group, name=f"{name}_schema", node=node, replace=True)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig, replace=True)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig, replace=True)
    cs.store(group="diagnostics", name="diagnostics_schema", node=DiagnosticsConfig, replace=True)


def to_objects(cfg: DictConfig) -> JobSpec:
    """Validate a composed job config and return it as typed dataclasses.

    Raises ConfigError with a one-line message naming the key and the allowed values.
    """
    parts: dict[str, Any] = {}
    for group in ("model", "data", "optimizer", "clip"):
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"{group} is missing; allowed: {'|'.join(SCHEMAS[group])}")
        name = node.get("name")
        _choice(f"{group}.name", name, tuple(SCHEMAS[group]))
        parts[group] = _to_dataclass(SCHEMAS[group][name], node, group)
    parts["trainer"] = _to_dataclass(TrainerConfig, cfg.trainer, "trainer")
    parts["tracking"] = _to_dataclass(TrackingConfig, cfg.tracking, "tracking")
    if cfg.get("diagnostics") is not None:
        parts["diagnostics"] = _to_dataclass(DiagnosticsConfig, cfg.diagnostics, "diagnostics")
    spec = JobSpec(**parts)
    allowed = COMPATIBLE_DATA[spec.model.name]
    _require(spec.data.name in allowed, "data", spec.data.name, f"{'|'.join(allowed)} for model={spec.model.name}")
    if spec.trainer.loss == "bce":
        _require(spec.data.name in ("moons", "circles"), "trainer.loss", "bce",
                 "cross_entropy for data with more than 2 classes")
    return spec


def _to_dataclass(schema: type, node: DictConfig, group: str) -> Any:
    from omegaconf.errors import OmegaConfBaseException

    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(typed)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or group
        msg = str(e).splitlines()[0]
        fields = ", ".join(f for f in schema.__dataclass_fields__)
        raise ConfigError(f"{group}.{key.split('.')[-1] if key != group else ''}: {msg}; allowed keys: {fields}") from None
