"""Subcommands of the ``gradsweep`` console script."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from gradsweep.cli import command

TRAIN = Path(__file__).resolve().parent.parent / "train.py"


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, e.g. -m clip.max_norm=1,5,20")


@command("train", "run src/train.py with Hydra overrides (same as python src/train.py ...)", _train_args)
def train(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, str(TRAIN), *args.overrides])
