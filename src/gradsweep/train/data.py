"""Data sets: generated digit-sum sequences and scikit-learn's toy sets, as tensors.

Nothing is downloaded: digit-sum is generated (or read from a folder), moons/circles come from
scikit-learn's generators and digits from the copy scikit-learn ships.
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gradsweep.checks import choice, positive, require
from gradsweep.errors import DataError
from gradsweep.train.registry import register

SPLITS = ("train", "dev", "test")


@dataclass
class DataConfig:
    name: str = "???"  # chosen by the config group
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
        require(self.length >= 3, "data.length", self.length, "an integer >= 3")
        for k in ("train_copies", "dev_copies", "test_copies"):
            require(getattr(self, k) >= 1, f"data.{k}", getattr(self, k), "an integer >= 1")


@dataclass
class ToyConfig(DataConfig):
    """scikit-learn make_moons / make_circles."""

    name: str = "moons"
    n_samples: int = 1000
    noise: float = 0.1
    factor: float = 0.5  # circles only: inner/outer radius ratio
    split: list[int] = field(default_factory=lambda: [640, 160, 200])  # train/dev/test

    def __post_init__(self) -> None:
        choice("data.name", self.name, ("moons", "circles"))
        positive("data.noise", self.noise, strict=False)
        require(len(self.split) == 3 and sum(self.split) == self.n_samples and min(self.split) > 0,
                 "data.split", list(self.split), f"three positive sizes summing to data.n_samples={self.n_samples}")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn load_digits: 1797 8x8 images shipped with the package."""

    name: str = "digits"
    dev_fraction: float = 0.2
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        ok = 0 < self.dev_fraction < 1 and 0 < self.test_fraction < 1 and self.dev_fraction + self.test_fraction < 1
        require(ok, "data.dev_fraction+test_fraction", (self.dev_fraction, self.test_fraction),
                 "fractions in (0, 1) with a sum < 1")


@dataclass
class Split:
    x: torch.Tensor  # long (B, L) for sequences, float (B, F) or (B, 1, 8, 8) otherwise
    y: torch.Tensor  # long class index

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSet:
    train: Split
    dev: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # per-example shape of x


# ------------------------------------------------------------------------------- digit-sum
def digit_sum_split(length: int, copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The 100 base sequences [n1, n2, 0, ...], each copied ``copies`` times with one random
    position >= 2 set to a random digit. Label n1 + n2."""
    base = np.zeros((100, length), dtype=np.int64)
    base[:, 0] = np.repeat(np.arange(10), 10)
    base[:, 1] = np.tile(np.arange(10), 10)
    x = np.repeat(base, copies, axis=0)
    pos = rng.integers(2, length, size=len(x))
    x[np.arange(len(x)), pos] = rng.integers(0, 10, size=len(x))
    return x, x[:, 0] + x[:, 1]


def generate_digit_sum(cfg: DigitSumConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(cfg.seed)
    copies = {"train": cfg.train_copies, "dev": cfg.dev_copies, "test": cfg.test_copies}
    return {s: digit_sum_split(cfg.length, copies[s], rng) for s in SPLITS}


def write_digit_sum(folder: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in splits.items():
        lines = [" ".join(map(str, row)) + f"\t{label}\n" for row, label in zip(x.tolist(), y.tolist(), strict=True)]
        (folder / f"{name}.txt").write_text("".join(lines))


DIGIT = re.compile(r"[0-9]")
LABEL = re.compile(r"[0-9]{1,2}")


def read_digit_sum_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Lines ``d d d ... d<TAB>label``; every sequence must have the same length."""
    if not path.is_file():
        raise DataError(f"data.path: missing file {path}; expected train.txt, dev.txt, test.txt")
    rows: list[list[int]] = []
    labels: list[int] = []
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError as e:
        lineno = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{lineno}: not a text file of ASCII digits (byte {e.object[e.start]:#04x}); "
                        "expected 'd d ... d<TAB>label'") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        seq, sep, label = line.partition("\t")
        try:
            if not sep:
                raise ValueError("no TAB before the label")
            tokens, label = seq.split(), label.strip()
            # int() would also take '1_0', '+5' and other scripts' digits: only 0-9 are digits here
            if not tokens or not all(DIGIT.fullmatch(t) for t in tokens) or not LABEL.fullmatch(label) \
                    or int(label) > 18:
                raise ValueError("digits must be 0-9 and the label 0-18")
            digits, lab = [int(t) for t in tokens], int(label)
            if rows and len(digits) != len(rows[0]):
                raise ValueError(f"length {len(digits)} differs from {len(rows[0])}")
        except ValueError as e:
            raise DataError(f"{path}:{n}: bad line {line[:40]!r}: {e}; expected 'd d ... d<TAB>label'") from None
        rows.append(digits)
        labels.append(lab)
    if not rows:
        raise DataError(f"{path}: no examples")
    return np.array(rows, dtype=np.int64), np.array(labels, dtype=np.int64)


def read_digit_sum(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data.path={str(folder)!r}: folder not found; expected a folder with train.txt, "
                        "dev.txt, test.txt")
    out = {s: read_digit_sum_file(folder / f"{s}.txt") for s in SPLITS}
    lengths = {x.shape[1] for x, _ in out.values()}
    if len(lengths) != 1:
        raise DataError(f"data.path={str(folder)!r}: splits have different sequence lengths {sorted(lengths)}")
    return out


@register("data", "digit_sum", DigitSumConfig)
def _digit_sum(cfg: DigitSumConfig) -> DataSet:
    arrays = read_digit_sum(cfg.path) if cfg.path else generate_digit_sum(cfg)
    splits = {s: Split(torch.from_numpy(x), torch.from_numpy(y)) for s, (x, y) in arrays.items()}
    length = splits["train"].x.shape[1]
    return DataSet(**splits, num_classes=19, input_shape=(length,))


# ------------------------------------------------------------------------------ scikit-learn
def _split_arrays(x: np.ndarray, y: np.ndarray, sizes: list[int], seed: int, shape) -> DataSet:
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    bounds = np.cumsum([0, *sizes])
    parts = {
        s: Split(torch.tensor(x[a:b], dtype=torch.float32), torch.tensor(y[a:b], dtype=torch.long))
        for s, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }
    return DataSet(**parts, num_classes=int(y.max()) + 1, input_shape=shape)


@register("data", "moons", ToyConfig)
@register("data", "circles", ToyConfig)
def _toy(cfg: ToyConfig) -> DataSet:
    from sklearn.datasets import make_circles, make_moons

    if cfg.name == "moons":
        x, y = make_moons(n_samples=cfg.n_samples, noise=cfg.noise, random_state=cfg.seed)
    else:
        x, y = make_circles(n_samples=cfg.n_samples, factor=cfg.factor, noise=cfg.noise, random_state=cfg.seed)
    return _split_arrays(x, y, list(cfg.split), cfg.seed, (2,))


@register("data", "digits", DigitsConfig)
def _digits(cfg: DigitsConfig) -> DataSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0)[:, None, :, :]
    n = len(x)
    n_dev, n_test = int(n * cfg.dev_fraction), int(n * cfg.test_fraction)
    return _split_arrays(x, bunch.target, [n - n_dev - n_test, n_dev, n_test], cfg.seed, (1, 8, 8))
