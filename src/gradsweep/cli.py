"""The ``gradsweep`` console script: subcommands beside the Hydra entry point (src/train.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from gradsweep.errors import GradsweepError

# name -> (help, add_arguments(parser), run(args) -> exit code); modules register themselves here
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run
    return register


def _load_commands() -> None:
    import importlib

    for module in ("gradsweep.commands",):
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    _load_commands()
    parser = argparse.ArgumentParser(prog="gradsweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in sorted(COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except GradsweepError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # run through the importable module so commands register in the same COMMANDS table
    from gradsweep.cli import main as _main

    sys.exit(_main())
