"""The ``gradsweep`` console script: subcommands beside the Hydra entry point (src/train.py).

Each subcommand imports what it needs when it runs, so ``gradsweep --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable

from gradsweep.errors import GradsweepError, first_line
from gradsweep.paths import TRAIN

DESCRIPTION = ("Subcommands beside the Hydra entry point (python src/train.py ...): reports, studies, named and "
               "scheduled sweeps, delivery of spooled runs, clean-up.")
# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add_arguments, run)
        return run
    return register


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, e.g. -m clip.max_norm=1,5,20")


@command("train", "run src/train.py with Hydra overrides (same as python src/train.py ...)", _train_args)
def train(args: argparse.Namespace) -> int:
    return subprocess.call([sys.executable, str(TRAIN), *args.overrides])


def _sync_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spool", type=Path, default=Path("mlruns") / "spool",
                   help="spool folder (default: mlruns/spool, where runs are journaled)")
    p.add_argument("--wait", type=float, default=0.0, help="keep retrying an unreachable store this many seconds")


BUSY_WAIT_S = 30.0  # a journal another process is delivering (a job's delivery worker finishing up)


@command("sync", "deliver run journals still spooled on disk (e.g. after a tracking-server outage)", _sync_args)
def sync(args: argparse.Namespace) -> int:
    import time

    from gradsweep.track.delivery import OutageReporter, deliver_all, pending, refused, remove_delivered
    from gradsweep.track.journal import HEADER, STATE, close_orphan, read_json, writer_alive

    for folder in pending(args.spool):
        if close_orphan(folder):
            print(f"spooled run {folder.name}: its process is gone without ending the run; it ends KILLED "
                  "(failure=worker_died)")
    # a run whose process is still writing it is that process's to deliver (its delivery process
    # follows the journal, and the job sends the rest itself at its end): not ours, and not late
    live = {folder for folder in pending(args.spool) if writer_alive(folder)}
    for folder in sorted(live):
        print(f"{_live_run(folder)} is live: its own process is writing it and delivers it")
    folders = [folder for folder in pending(args.spool) if folder not in live]
    if not folders:
        print(f"nothing {'else ' if live else ''}to deliver in {args.spool}")
        remove_delivered(args.spool)
        return _say_refused(refused(args.spool))
    deadline = time.monotonic() + args.wait
    reporter = OutageReporter(sys.stdout)
    while True:
        left = deliver_all([f for f in pending(args.spool) if f not in live], reporter, args.spool,
                           busy_wait_s=BUSY_WAIT_S)
        if left == 0 or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    print(f"delivered {len(folders) - left} of {len(folders)} spooled runs"
          + (f"; {left} still spooled" if left else ""))
    for folder in folders:  # runs created only now: their ids are news (a sweep's parent needs its summary)
        header, state = read_json(folder / HEADER) or {}, read_json(folder / STATE) or {}
        create = header.get("create")
        if create and state.get("run_id"):
            top = not (create.get("parent_run_id") or create.get("parent_local_id"))
            print(f"  created run {state['run_id']} ({create.get('run_name')})"
                  + (f"; its summary: gradsweep report {state['run_id']}" if top and
                     str(create.get("run_name", "")).startswith("sweep") else ""))
    remove_delivered(args.spool)  # what delivered runs of ended processes left
    return max(1 if left else 0, _say_refused(refused(args.spool)))


def _live_run(folder: Path) -> str:
    """``run <name> (<id>, pid 12 on host)`` for a journal whose writer is alive."""
    from gradsweep.locks import describe
    from gradsweep.track.journal import HEADER, STATE, read_json

    header, state = read_json(folder / HEADER) or {}, read_json(folder / STATE) or {}
    name = (header.get("create") or {}).get("run_name")
    run_id = state.get("run_id") or header.get("run_id")
    who = ", ".join(x for x in (run_id, describe(header.get("worker") or "")) if x)
    return f"run {name or folder.name}" + (f" ({who})" if who else "")


def _say_refused(journals: list) -> int:
    """Journals whose run the store would not create are kept and explained, never retried forever."""
    for folder, reason in journals:
        print(f"refused by the tracking store: {folder} ({reason}); its records stay there. Fix the cause "
              "(e.g. restore the experiment) and delete the folder's state.json to deliver it again")
    return 1 if journals else 0


def module_command(name: str, help: str, module: str) -> None:
    """A command whose arguments and body live in ``module`` (``add_arguments(parser)``, ``run(args)``),
    imported only when the command is used (they load MLflow and matplotlib)."""
    command(name, help, lambda p: importlib.import_module(module).add_arguments(p))(
        lambda args: importlib.import_module(module).run(args))


module_command("report", "figures and a summary table (with gradient-health verdicts) of a sweep, study or experiment",
               "gradsweep.report.build")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a named sweep once (for cron, systemd timers, Kubernetes CronJobs)")
    run.add_argument("name", help="a sweep in sweeps/ (e.g. lr_layers_clip)")
    run.add_argument("--trials", type=int, help="trials for this run (default: the schedule's trials_per_run, "
                                                "else the sweep's n_trials)")
    run.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial (e.g. trainer.epochs=5)")
    sub.add_parser("list", help="the named sweeps and their schedules")


@command("sweep", "run or list named sweeps (sweeps/*.yaml)", _sweep_args)
def sweep(args: argparse.Namespace) -> int:
    import logging
    import signal

    from gradsweep.sweep.schedule import SweepRunner, load_schedule, sweep_names

    if args.action == "list":
        bad = 0
        for name in sweep_names():
            try:
                sched = load_schedule(name)
            except GradsweepError as e:  # one bad file does not hide the others
                bad += 1
                print(f"{name:<20} invalid: {e}")
                continue
            when = (f"cron {sched.cron!r} {sched.timezone}, {sched.trials_per_run} trials/run" if sched
                    else "unscheduled")
            print(f"{name:<20} {when}")
        return 2 if bad else 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    sched = load_schedule(args.name)
    trials = args.trials if args.trials is not None else (sched.trials_per_run if sched else None)
    runner = SweepRunner(extra_overrides=args.overrides)
    signal.signal(signal.SIGTERM, lambda *_: runner.terminate())
    return runner.run(args.name, trials)


def _schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", action="append", dest="sweeps", help="only this sweep (repeatable; default: all "
                                                                  "sweeps with a schedule)")
    p.add_argument("--max-runs", type=int, help="exit after this many sweep runs in all")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every trial")


@command("schedule", "run scheduled sweeps whenever they are due (long-running; SIGTERM stops it cleanly)",
         _schedule_args)
def schedule(args: argparse.Namespace) -> int:
    import logging

    from gradsweep.sweep.schedule import Scheduler

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # it logs every tick; we log runs and skips
    return Scheduler(args.sweeps, max_runs=args.max_runs, extra_overrides=args.overrides).start()


module_command("gc", "where gradsweep's files are and how big; remove what the store already holds (dry run "
               "unless --yes)", "gradsweep.cli.gc")
module_command("studies", "re-run the seven studies over seeds and regenerate docs/studies.md's numbers and tables",
               "gradsweep.cli.studies")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradsweep", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in sorted(COMMANDS.items()):
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args) or 0
    except GradsweepError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
