"""Where the checkout's parts are, for code that must find them from inside the package."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  #: src/gradsweep
SRC = PACKAGE.parent  #: src/ (put on PYTHONPATH of the processes we start)
ROOT = SRC.parent  #: the checkout
TRAIN = SRC / "train.py"  #: the Hydra entry point
CONF_DIR = ROOT / "conf"
SWEEPS_DIR = ROOT / "sweeps"
