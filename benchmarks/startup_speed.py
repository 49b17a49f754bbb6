"""What the user waits for: the default job and the default 3-job sweep as whole processes,
against a bare PyTorch script of the same job (benchmarks/bare_srn.py: same data, model, 250
steps; no tracking, no Hydra), interleaved, on a warm embedded store.

Prints per case the wall time (median and min over repeats), the time to the first console line,
and the ratio to the bare script, with the targets (job <= 1.3x, sweep <= 2x, first line <= 1 s).
Run: .venv/bin/python benchmarks/startup_speed.py [--repeats 3] [--first-line]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from gradsweep.train.data import DigitSumConfig, generate_digit_sum, write_digit_sum  # noqa: E402

TRAIN = str(ROOT / "src" / "train.py")


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(seconds to exit, seconds to the first console line), on a terminal (a pty): what a user sees
    (train.py holds its plan line back when its output is not a terminal)."""
    import pty

    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}
    master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    first, seen = None, b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if first is None and b"\n" in seen:
            first = time.monotonic() - start
    os.close(master)
    code = proc.wait()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} exited {code}")
    return time.monotonic() - start, first if first is not None else float("nan")


def first_line(repeats: int, work: Path) -> None:
    """``--first-line``: seconds to the plan line of a one-step dry run (``tracking.backend=memory``),
    warm, and as on the first run after installing (every module compiled afresh: an empty
    ``PYTHONPYCACHEPREFIX``)."""
    cmd = [sys.executable, TRAIN, "trainer.epochs=1", "tracking.backend=memory"]
    timed(cmd, work)
    times: dict[str, list[float]] = {"warm": [], "first run after install (no bytecode)": []}
    for _ in range(repeats):
        times["warm"].append(timed(cmd, work)[1])
        fresh = tempfile.mkdtemp(prefix="pycache-", dir=work)
        times["first run after install (no bytecode)"].append(timed(cmd, work, {"PYTHONPYCACHEPREFIX": fresh})[1])
    print(f"\n{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {repeats} interleaved repeats\n")
    print("| case | first line (s) median | min | max |\n|---|---|---|---|")
    for case, values in times.items():
        print(f"| {case} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--first-line", action="store_true", help="only the time to the first line, warm and cold")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gradsweep-speed-"))
    if args.first_line:
        first_line(args.repeats, work)
        return
    data = work / "data"
    write_digit_sum(data, generate_digit_sum(DigitSumConfig()))  # the default job's data, as files
    cases = {
        "bare PyTorch script": [sys.executable, str(ROOT / "benchmarks" / "bare_srn.py"), str(data)],
        "default job": [sys.executable, TRAIN],
        "default 3-job sweep": [sys.executable, TRAIN, "-m", "clip.max_norm=1,5,20"],
    }
    timed(cases["default job"], work)  # a warm store: created once, as after a user's first job
    walls: dict[str, list[float]] = {c: [] for c in cases}
    firsts: dict[str, list[float]] = {c: [] for c in cases}
    for i in range(args.repeats):
        for case, cmd in cases.items():
            wall, first = timed(cmd, work)
            walls[case].append(wall)
            firsts[case].append(first)
            print(f"  repeat {i + 1}/{args.repeats} {case}: {wall:.2f} s", file=sys.stderr)
    bare = statistics.median(walls["bare PyTorch script"])
    targets = {"default job": "<= 1.3x", "default 3-job sweep": "<= 2x", "bare PyTorch script": ""}
    print(f"\n{os.cpu_count()} CPUs, torch threads 1, {args.repeats} interleaved repeats, warm embedded store\n")
    print("| case | wall median (s) | wall min (s) | first line (s) | x bare | target |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        med = statistics.median(walls[case])
        print(f"| {case} | {med:.2f} | {min(walls[case]):.2f} | {statistics.median(firsts[case]):.2f} | "
              f"{med / bare:.2f}x | {targets[case]} |")


if __name__ == "__main__":
    main()
