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


def _sync_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spool", type=Path, default=Path("mlruns") / "spool",
                   help="spool folder (default: mlruns/spool, where runs are journaled)")
    p.add_argument("--wait", type=float, default=0.0, help="keep retrying an unreachable store this many seconds")


@command("sync", "deliver run journals still spooled on disk (e.g. after a tracking-server outage)", _sync_args)
def sync(args: argparse.Namespace) -> int:
    import time

    from gradsweep.delivery import OutageReporter, deliver_all, pending

    folders = pending(args.spool)
    if not folders:
        print(f"nothing to deliver in {args.spool}")
        return 0
    deadline = time.monotonic() + args.wait
    reporter = OutageReporter(sys.stdout)
    while True:
        left = deliver_all(pending(args.spool), reporter, args.spool)
        if left == 0 or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    print(f"delivered {len(folders) - left} of {len(folders)} spooled runs" + (f"; {left} still spooled" if left else ""))
    return 1 if left else 0


def _report_args(p: argparse.ArgumentParser) -> None:
    from gradsweep.report import add_arguments  # light: MLflow and matplotlib load only when it runs

    add_arguments(p)


@command("report", "figures and a summary table (with gradient-health verdicts) of a sweep, study or experiment",
         _report_args)
def report(args: argparse.Namespace) -> int:
    from gradsweep.report import run

    return run(args)
