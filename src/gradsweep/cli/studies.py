"""``gradsweep studies``: re-run the seven studies over seeds and regenerate docs/studies.md's numbers
(the work: :mod:`gradsweep.studies.regenerate`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from gradsweep.errors import ConfigError
from gradsweep.studies.regenerate import COMPARISONS, Settings, allowed_studies, classic_studies, regenerate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=Settings.seeds,
                   help=f"seeds per variant: trainer.seed=range(0,N) (default {Settings.seeds})")
    p.add_argument("--only", action="append", help="only this study (repeatable; default: the seven classic ones; "
                                                   f"also: {', '.join(COMPARISONS)})")
    p.add_argument("--jobs", type=int, default=Settings.jobs,
                   help=f"jobs in parallel (Hydra's joblib launcher; default {Settings.jobs})")
    p.add_argument("--docs", type=Path, default=Settings.docs, help="the document to update")
    p.add_argument("--workdir", type=Path, help="where the runs and the store go (default: a new temp dir); "
                                                "studies it already ran are reported again, not re-run")
    p.add_argument("--no-docs", action="store_true", help="run and report only; leave the docs as they are")


def run(args: argparse.Namespace) -> int:
    allowed = allowed_studies()
    names = args.only or classic_studies()
    unknown = sorted(set(names) - set(allowed))
    if unknown or args.seeds < 1 or args.jobs < 1:
        raise ConfigError(f"--only={','.join(unknown)} / --seeds={args.seeds} / --jobs={args.jobs} is invalid; "
                          f"allowed: studies {'|'.join(allowed)}, seeds >= 1, jobs >= 1")
    return regenerate(names, Settings(args.seeds, args.jobs, args.docs, args.no_docs), args.workdir)
