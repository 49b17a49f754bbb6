"""Models and data from the user's own code: ``model=custom model._target_=my_pkg.nets.Net
+model.hidden=64`` and ``data=custom data._target_=my_pkg.data.make``.

``_target_`` is an import path (a package on ``PYTHONPATH`` or installed; never copied) of a class or
function; every other key of the group is passed to it as a keyword argument, as Hydra's
``instantiate`` does with a flat config. Imported here with importlib rather than through Hydra:
the training layer never imports Hydra (``gradsweep.watch`` users do not have it configured), and
for a flat config ``instantiate`` is exactly "import, then call with the keys".

The data callable returns ``(train, dev, test)``, each a ``torch.utils.data.Dataset`` of ``(x, y)``
pairs (a ``TensorDataset`` is used as it is); they are stacked into tensors once, as the built-in
data sets are. :func:`check_task` runs the model on two examples before any run exists, so a model
whose outputs do not fit ``trainer.loss`` is one line naming the key.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradsweep.checks import require
from gradsweep.errors import ConfigError, first_line
from gradsweep.train.data import DataConfig, DataSet, Split
from gradsweep.train.models import ModelConfig
from gradsweep.train.registry import register


@dataclass
class CustomModelConfig(ModelConfig):
    """``model._target_``: the import path of an ``nn.Module`` class (or a function returning one);
    the group's other keys (``+model.hidden=64``) are its keyword arguments (``kwargs``)."""

    name: str = "custom"
    _target_: str = "???"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self._target_ not in ("", "???"), "model._target_", self._target_,
                "the import path of your model (e.g. my_pkg.nets.Net), on PYTHONPATH or installed")


@dataclass
class CustomDataConfig(DataConfig):
    """``data._target_``: the import path of a callable returning ``(train, dev, test)`` datasets of
    ``(x, y)`` pairs; the group's other keys are its keyword arguments (``kwargs``)."""

    name: str = "custom"
    _target_: str = "???"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self._target_ not in ("", "???"), "data._target_", self._target_,
                "the import path of your data function (e.g. my_pkg.data.make), on PYTHONPATH or installed")


def locate(key: str, path: str) -> Any:
    """The object at ``path`` (``package.module.name``); ConfigError naming ``key`` if it is not there."""
    module_path, _, name = path.rpartition(".")
    if not module_path or not name:
        raise ConfigError(f"{key}={path!r} is invalid; allowed: a dotted import path such as my_pkg.nets.Net")
    try:
        module = importlib.import_module(module_path)
    except Exception as e:  # the user's module failed to import: say why, in one line
        why = "not found on PYTHONPATH or installed" if isinstance(e, ModuleNotFoundError) else \
            f"importing it raised {type(e).__name__}: {first_line(e, default='')}"
        raise ConfigError(f"{key}={path!r}: module {module_path} {why}") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}={path!r}: {module_path} has no {name}")
    return getattr(module, name)


def _call(key: str, path: str, kwargs: dict[str, Any]) -> Any:
    target = locate(key, path)
    try:
        return target(**kwargs)
    except TypeError as e:  # a keyword the callable does not take, a missing argument
        raise ConfigError(f"{key}={path!r}: {e}") from None


@register("model", "custom", CustomModelConfig, data=("custom", "digit_sum", "moons", "circles", "digits"),
          open_keys=True)
def _custom_model(cfg: CustomModelConfig, data: DataSet, num_classes: int) -> nn.Module:
    model = _call("model._target_", cfg._target_, dict(cfg.kwargs))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg._target_!r}: returned {type(model).__name__!r}, "
                          "not a torch.nn.Module; allowed: an nn.Module class or a function returning one")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model._target_={cfg._target_!r}: the model has no trainable parameters")
    return model


@register("data", "custom", CustomDataConfig, open_keys=True)
def _custom_data(cfg: CustomDataConfig) -> DataSet:
    out = _call("data._target_", cfg._target_, dict(cfg.kwargs))
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ConfigError(f"data._target_={cfg._target_!r}: returned {type(out).__name__}; allowed: "
                          "(train, dev, test), each a torch.utils.data.Dataset of (x, y) pairs")
    splits = {name: to_split(cfg._target_, name, ds) for name, ds in zip(("train", "dev", "test"), out, strict=True)}
    y = splits["train"].y
    classes = int(y.max()) + 1 if not torch.is_floating_point(y) and len(y) else 0
    return DataSet(**splits, num_classes=classes, input_shape=tuple(splits["train"].x.shape[1:]))


def to_split(target: str, name: str, ds: Any) -> Split:
    """A dataset of (x, y) pairs as two stacked tensors."""
    where = f"data._target_={target!r}: the {name} split"
    if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
    else:
        try:
            n = len(ds)
            pairs = [ds[i] for i in range(n)]
        except Exception as e:
            raise ConfigError(f"{where} is not a sized dataset of (x, y) pairs: {type(e).__name__}: {e}") from None
        if not n:
            raise ConfigError(f"{where} is empty")
        if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ConfigError(f"{where}: items are not (x, y) pairs")
        try:
            x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"{where}: items cannot be stacked into tensors ({first_line(e)})") from None
    if len(x) != len(y) or not len(y):
        raise ConfigError(f"{where} has {len(x)} inputs and {len(y)} targets")
    return Split(x, y)


def check_task(model: nn.Module, data: DataSet, loss: str, key: str = "model._target_", target: str = "") -> None:
    """Run the model on two training examples: its output must fit ``trainer.loss`` for these
    targets. ConfigError naming ``key`` otherwise (before any run exists)."""
    x, y = data.train.x[:2], data.train.y[:2]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise ConfigError(f"{key}={target!r}: the model fails on a batch of the data (x {list(x.shape)} "
                          f"{str(x.dtype).removeprefix('torch.')}): {type(e).__name__}: "
                          f"{first_line(e)}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{key}={target!r}: the model returns {type(out).__name__}; allowed: one tensor of outputs")
    shape, ys = list(out.shape), list(y.shape)
    fits = {
        "cross_entropy": out.dim() == 2 and out.shape[0] == len(y) and out.shape[1] >= 2 and y.dim() == 1,
        "bce": out.shape[0] == len(y) and out.numel() == len(y),
        "mse": out.numel() == y.numel() and out.shape[0] == len(y),
        "lm": out.dim() == 3 and y.dim() == 2 and tuple(out.shape[:2]) == tuple(y.shape),
    }[loss]
    want = {"cross_entropy": "(batch, classes) logits for class targets (batch,)",
            "bce": "one logit per example, (batch,) or (batch, 1)",
            "mse": "one prediction per target value, the targets' shape",
            "lm": "(batch, time, vocab) logits for token targets (batch, time)"}[loss]
    if not fits:
        raise ConfigError(f"{key}={target!r}: outputs {shape} for targets {ys} do not fit trainer.loss={loss}; "
                          f"allowed: {want}")
