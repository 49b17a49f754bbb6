"""Per-step cost of each clipping rule against norm clipping, on the default job (SRN, digit-sum, 250 steps).

Prints a table with, for each rule (none, norm, autoclip, agc, zclip, adagc):
  step      the whole training step as the loop runs it (forward, backward, per-parameter norms, the
            rule, optimizer step, the one host transfer of the step vector with the rule's metrics):
            median and best over the repeats of the mean ms/step of a 250-step run, and the median
            against norm clipping
  rule      the rule's own call alone, on fixed gradients (microseconds, median of many calls)
Variants are interleaved within each repeat, so that drift in the machine's speed hits all alike.
Subnormal floats are flushed to zero unless --keep-denormals: each rule trains the model along its own
trajectory, and one that passes through subnormal values runs slower on a CPU for a reason that is not
the rule's own cost (kept, AGC's step measured +78% against norm clipping, none's -17%).
Run: .venv/bin/python benchmarks/clip_overhead.py [--repeats 11] [--hidden 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from gradsweep.train.data import DigitSumConfig
from gradsweep.train.loop import Trainer, TrainerConfig
from gradsweep.train.models import SRNConfig
from gradsweep.train.optim import SGDConfig
from gradsweep.train.registry import build, parts
from gradsweep.train.sinks import HistorySink

RULES = ("none", "norm", "autoclip", "agc", "zclip", "adagc")
CFG = TrainerConfig(epochs=50, batch_size=64, reduction="sum", device="cpu")


def clipper(rule: str):
    return build("clip", parts("clip")[rule].schema(name=rule))  # the rule at its defaults


def setup(hidden: int, rule: str):
    torch.manual_seed(0)
    data = build("data", DigitSumConfig())
    model = build("model", SRNConfig(input_size=hidden, hidden_size=hidden), data, data.num_classes)
    opt = build("optimizer", SGDConfig(lr=0.2), model.parameters())
    return Trainer(model, data, opt, clipper(rule), CFG, HistorySink(), torch.device("cpu"))


def step_time(hidden: int, rule: str) -> float:
    """Mean seconds per step of the default job's 250 steps, as Trainer.run takes them (no evaluation)."""
    t = setup(hidden, rule)
    gen = torch.Generator().manual_seed(0)
    n, bs = len(t.train_y), t.batch_size
    t0 = time.perf_counter()
    for _ in range(CFG.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            t.train_step(t.train_x[idx], t.train_y[idx])
    return (time.perf_counter() - t0) / t.total_steps


def rule_time(hidden: int, rule: str, calls: int = 300) -> float:
    """Median seconds of one call of the rule alone, on the default model's gradients of step 0."""
    t = setup(hidden, rule)
    loss = torch.nn.functional.cross_entropy(t.model(t.train_x[:64]), t.train_y[:64], reduction="sum")
    loss.backward()
    saved = [g.clone() for g in t.norms.grads()]
    times = []
    for _ in range(calls):
        for p, g in zip(t.norms.params, saved, strict=True):
            p.grad.copy_(g)
        grads = t.norms.grads()
        per_param = t.norms.per_param(grads)
        total = t.norms.total(per_param)
        t0 = time.perf_counter()
        t.clipper(t.norms, grads, total, per_param=per_param)
        if t.clip_metrics:
            t.clipper.extra()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--hidden", type=int, default=32, help="SRN width (32 = the default job)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the trainer's default: 1)")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="leave subnormal floats on: the rules lead to different trajectories, and where one reaches "
                         "subnormal values the CPU slows down for reasons that are not the rule's cost")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    for rule in RULES:  # warm-up: imports, allocator, first-call costs
        step_time(args.hidden, rule)
    runs: dict[str, list[float]] = {r: [] for r in RULES}
    for _ in range(args.repeats):
        for rule in RULES:
            runs[rule].append(step_time(args.hidden, rule))
    alone = {r: rule_time(args.hidden, r) for r in RULES}
    base = statistics.median(runs["norm"])
    print(f"SRN hidden {args.hidden}, digit-sum, batch 64, 250 steps; torch threads {args.threads}; "
          f"{args.repeats} interleaved repeats; denormals {'kept' if args.keep_denormals else 'flushed'}\n")
    best = min(runs["norm"])
    print("| rule | step ms, median | vs norm | step ms, best | vs norm | rule alone, us |")
    print("|---|---|---|---|---|---|")
    for rule in RULES:
        med, low = statistics.median(runs[rule]), min(runs[rule])
        rel = "" if rule == "norm" else f"{(med / base - 1) * 100:+.1f} %"
        rel_best = "" if rule == "norm" else f"{(low / best - 1) * 100:+.1f} %"
        print(f"| {rule} | {med * 1e3:.3f} | {rel} | {low * 1e3:.3f} | {rel_best} | {alone[rule] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
