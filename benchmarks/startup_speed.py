"""What the user waits for: the default job and the default 3-job sweep as whole processes,
against a bare PyTorch script of the same job (benchmarks/bare_srn.py: same data, model, 250
steps; no tracking, no Hydra), interleaved, on a warm embedded store.

Prints per case the wall time (median and min over repeats), the time to the first console line,
and the ratio to the bare script, with the targets (job <= 1.3x, sweep <= 2x, first line <= 1 s).
Run: .venv/bin/python benchmarks/startup_speed.py [--repeats 3]
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


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds to exit, seconds to the first line on stdout or stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = None
    for _ in iter(proc.stdout.readline, b""):
        if first is None:
            first = time.monotonic() - start
    code = proc.wait()
    if code != 0:
        sys.exit(f"{' '.join(cmd)} exited {code}")
    return time.monotonic() - start, first if first is not None else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gradsweep-speed-"))
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
    print(f"| case | wall median (s) | wall min (s) | first line (s) | x bare | target |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        med = statistics.median(walls[case])
        print(f"| {case} | {med:.2f} | {min(walls[case]):.2f} | {statistics.median(firsts[case]):.2f} | "
              f"{med / bare:.2f}x | {targets[case]} |")


if __name__ == "__main__":
    main()
