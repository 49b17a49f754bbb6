"""Models and their schemas. Parameter names are part of the metric contract (``grad_norm/<param>``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from gradsweep.checks import choice, positive, require
from gradsweep.train.data import DataSet
from gradsweep.train.registry import register

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}
WEIGHT_INITS = ("normal", "uniform", "zeros", "xavier", "kaiming")
SRN_INITS = ("zeros", "normal", "uniform", "xavier")


@dataclass
class ModelConfig:
    name: str = "???"  # chosen by the config group
    #: depth: SRN/LSTM/GRU stacked recurrent layers, MLP hidden layers, CNN conv layers
    num_layers: int = 1

    def __post_init__(self) -> None:
        require(self.num_layers >= 1, "model.num_layers", self.num_layers, "an integer >= 1")


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
        require(self.input_size >= 1, "model.input_size", self.input_size, "an integer >= 1")
        require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")
        choice("model.init", self.init, SRN_INITS)


@dataclass
class RNNConfig(ModelConfig):
    """torch.nn.LSTM / torch.nn.GRU over embedded digits."""

    name: str = "lstm"
    input_size: int = 32
    hidden_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("model.name", self.name, ("lstm", "gru"))
        require(self.input_size >= 1, "model.input_size", self.input_size, "an integer >= 1")
        require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")


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
        require(self.hidden_size >= 1, "model.hidden_size", self.hidden_size, "an integer >= 1")
        if self.hidden_sizes is not None:
            require(len(self.hidden_sizes) >= 1 and min(self.hidden_sizes) >= 1, "model.hidden_sizes",
                     list(self.hidden_sizes), "null or a non-empty list of integers >= 1")
        choice("model.activation", self.activation, tuple(ACTIVATIONS))
        choice("model.weight_init", self.weight_init, WEIGHT_INITS)
        positive("model.weight_std", self.weight_std, strict=False)


@dataclass
class CNNConfig(ModelConfig):
    """num_layers 3x3 conv layers of `channels` channels, then a linear classifier."""

    name: str = "cnn"
    num_layers: int = 2
    channels: int = 16
    activation: str = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.channels >= 1, "model.channels", self.channels, "an integer >= 1")
        choice("model.activation", self.activation, tuple(ACTIVATIONS))



class SRNLayer(nn.Module):
    """One simple recurrent layer: h_t = tanh(x_t W + h_{t-1} U + b), parameters W, U, b.

    W and U are stored (input, output), as the equation reads (``x @ W``): their output units are
    columns, which they declare for unit-wise clipping (AGC); b is one vector, one unit."""

    agc_output_dims = {"W": 1, "U": 1}

    def __init__(self, input_size: int, hidden_size: int, init: str = "zeros", std: float = 0.01):
        super().__init__()
        self.W = nn.Parameter(torch.empty(input_size, hidden_size))
        self.U = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.b = nn.Parameter(torch.empty(1, hidden_size))
        for p in (self.W, self.U, self.b):
            if init == "zeros":
                nn.init.zeros_(p)
            elif init == "normal":
                nn.init.normal_(p, 0.0, std)
            elif init == "uniform":
                nn.init.uniform_(p, -std, std)
            elif p.dim() > 1 and p.shape[0] > 1:  # xavier on matrices; bias to zero
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, input) -> all hidden states (B, L, hidden)."""
        xw = x @ self.W  # the input projection for every step at once
        h = torch.zeros(x.shape[0], self.U.shape[0], device=x.device, dtype=x.dtype)
        out = []
        for t in range(x.shape[1]):
            h = torch.tanh(xw[:, t] + h @ self.U + self.b)
            out.append(h)
        return torch.stack(out, dim=1)


class SRN(nn.Module):
    """Embedding (Xavier-uniform) -> stacked SRN layers -> last hidden state -> linear classifier.

    One layer is named ``rnn`` (parameters ``rnn.W``, ``rnn.U``, ``rnn.b``); stacked layers are
    ``rnn.0``, ``rnn.1``, ...
    """

    def __init__(self, cfg: SRNConfig, num_classes: int):
        super().__init__()
        self.num_layers = cfg.num_layers
        self.embedding = nn.Embedding(10, cfg.input_size)
        nn.init.xavier_uniform_(self.embedding.weight)
        sizes = [cfg.input_size] + [cfg.hidden_size] * cfg.num_layers
        layers = [SRNLayer(i, o, cfg.init, cfg.init_std) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        self.rnn = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.rnn(self.embedding(x))[:, -1])


class TorchRNN(nn.Module):
    """Embedding -> torch.nn.LSTM or GRU -> last hidden state -> linear classifier."""

    def __init__(self, cfg: RNNConfig, num_classes: int):
        super().__init__()
        self.num_layers = cfg.num_layers
        self.embedding = nn.Embedding(10, cfg.input_size)
        cls = nn.LSTM if cfg.name == "lstm" else nn.GRU
        self.rnn = cls(cfg.input_size, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self.classifier = nn.Linear(cfg.hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embedding(x))
        return self.classifier(out[:, -1])


class MLP(nn.Module):
    """``layers.0 .. layers.{n-1}`` hidden Linear layers, ``layers.n`` the output layer.

    Widths: ``hidden_sizes`` when set, else ``num_layers`` x ``hidden_size``."""

    def __init__(self, cfg: MLPConfig, in_features: int, out_features: int):
        super().__init__()
        hidden = list(cfg.hidden_sizes) if cfg.hidden_sizes else [cfg.hidden_size] * cfg.num_layers
        self.num_layers = len(hidden)
        sizes = [in_features] + hidden + [out_features]
        linears = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.layers = nn.ModuleList(linears)
        self.act = ACTIVATIONS[cfg.activation]()
        for layer in linears:
            init_weight(layer.weight, cfg)
            nn.init.constant_(layer.bias, cfg.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation output of every hidden layer (for dead-unit diagnostics)."""
        out, x = [], x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
            out.append(x)
        return out


def init_weight(w: torch.Tensor, cfg: MLPConfig) -> None:
    if cfg.weight_init == "normal":
        nn.init.normal_(w, cfg.weight_mean, cfg.weight_std)
    elif cfg.weight_init == "uniform":
        nn.init.uniform_(w, -cfg.weight_std, cfg.weight_std)
    elif cfg.weight_init == "zeros":
        nn.init.zeros_(w)
    elif cfg.weight_init == "xavier":
        nn.init.xavier_uniform_(w)
    else:
        nonlinearity: Literal["relu", "leaky_relu"] = "leaky_relu" if cfg.activation == "leaky_relu" else "relu"
        nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)


class CNN(nn.Module):
    """``convs.i`` 3x3 conv layers (padding 1) -> global average pool -> ``classifier``."""

    def __init__(self, cfg: CNNConfig, in_channels: int, num_classes: int):
        super().__init__()
        self.num_layers = cfg.num_layers
        chans = [in_channels] + [cfg.channels] * cfg.num_layers
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.act = ACTIVATIONS[cfg.activation]()
        self.classifier = nn.Linear(cfg.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return self.classifier(x.mean(dim=(2, 3)))


def _flat_size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@register("model", "srn", SRNConfig, data=("digit_sum",))
def _srn(cfg: SRNConfig, data: DataSet, out_features: int) -> nn.Module:
    return SRN(cfg, out_features)


@register("model", "lstm", RNNConfig, data=("digit_sum",))
@register("model", "gru", RNNConfig, data=("digit_sum",))
def _torch_rnn(cfg: RNNConfig, data: DataSet, out_features: int) -> nn.Module:
    return TorchRNN(cfg, out_features)


@register("model", "mlp", MLPConfig, data=("moons", "circles", "digits"))
def _mlp(cfg: MLPConfig, data: DataSet, out_features: int) -> nn.Module:
    return MLP(cfg, _flat_size(data.input_shape), out_features)


@register("model", "cnn", CNNConfig, data=("digits",))
def _cnn(cfg: CNNConfig, data: DataSet, out_features: int) -> nn.Module:
    return CNN(cfg, data.input_shape[0], out_features)
