"""What gradsweep's telemetry costs per training step on the device it runs on (a GPU when there is
one, else the CPU), for a model of ~100 parameter tensors at step times of ~2-20 ms.

    .venv/bin/python benchmarks/gpu_step.py [--device auto|cpu|cuda] [--widths 256,1024] [--steps 300] [--repeats 3]

--device cuda (the GPU table) stops in one line, exit 2, where torch sees no CUDA device; auto
(the default) says on its first line when it falls back to the CPU and why.

The model is an MLP of 49 hidden layers (50 linear layers: 100 tensors) of --widths units on
scikit-learn's digits (1,078 training rows, batch 1,024), SGD with norm clipping at 1.0. Per width:

  bare ms         forward, backward, clip_grad_norm_, step: no norms, nothing recorded
  telemetry ms    gradsweep's Trainer (every step's loss, accuracy, total norms before and after
                  clipping and all 100 per-tensor norms, one transfer per trainer.sync_every_steps=50
                  steps) into an in-memory sink
  sync=1 ms       the same with trainer.sync_every_steps=1: a host sync every step
  overhead        telemetry / bare - 1 (target on a GPU: <= 3 %), and for sync=1

Each cell is the median over --repeats interleaved runs of --steps steps after a warm-up run (the
Trainer's end-of-run evaluation of dev and test, 360 rows each, is inside its time). On CUDA the
script then runs the Trainer once under torch.cuda.set_sync_debug_mode("error"): any host sync other
than the loop's own block transfers and evaluations raises, and the line says so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from gradsweep.train.clipping import NormClipConfig
from gradsweep.train.data import DigitsConfig
from gradsweep.train.loop import Trainer, TrainerConfig, batch_loss
from gradsweep.train.models import MLPConfig
from gradsweep.train.optim import SGDConfig
from gradsweep.train.registry import build
from gradsweep.train.sinks import HistorySink

LAYERS, BATCH = 49, 1024


def setup(width: int, device: torch.device):
    torch.manual_seed(0)
    data = build("data", DigitsConfig())
    model = build("model", MLPConfig(num_layers=LAYERS, hidden_size=width, activation="relu", weight_init="kaiming"),
                  data, data.num_classes).to(device)
    return data, model, build("optimizer", SGDConfig(lr=0.01), model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(width: int, steps: int, device: torch.device) -> float:
    """Seconds per step: the same batches (a permutation per epoch, indices moved to the device) and
    updates, nothing measured or recorded."""
    data, model, opt = setup(width, device)
    x, y = data.train.x.to(device), data.train.y.to(device)
    gen = torch.Generator().manual_seed(0)
    n, step = len(x), 0
    sync(device)
    t0 = time.perf_counter()
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, BATCH):
            if step == steps:
                break
            idx = perm[i:i + BATCH].to(device)
            opt.zero_grad(set_to_none=False)
            loss, _, _ = batch_loss(model(x[idx]), y[idx], "cross_entropy", "sum")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
    sync(device)
    return (time.perf_counter() - t0) / steps


def trainer(width: int, steps: int, device: torch.device, sync_every: int) -> Trainer:
    data, model, opt = setup(width, device)
    per_epoch = -(-len(data.train) // BATCH)
    cfg = TrainerConfig(epochs=-(-steps // per_epoch), batch_size=BATCH, eval_every_steps=10**9, device=device.type,
                        cpu_threads=0, sync_every_steps=sync_every)
    return Trainer(model, data, opt, build("clip", NormClipConfig(max_norm=1.0)), cfg, HistorySink(), device)


def telemetry(width: int, steps: int, device: torch.device, sync_every: int) -> float:
    t = trainer(width, steps, device, sync_every)
    sync(device)
    t0 = time.perf_counter()
    t.run()
    sync(device)
    return (time.perf_counter() - t0) / t.total_steps


def sync_debug_check(width: int, device: torch.device) -> str:
    t = trainer(width, 120, device, 50)
    torch.cuda.set_sync_debug_mode("error")
    try:
        t.run()
    except RuntimeError as e:
        return f"FAILED: a host sync inside the step loop: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return f"passed: {t.total_steps} steps under torch.cuda.set_sync_debug_mode('error'), no unplanned host sync"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default=None, help="hidden widths (default: 1024,2048,4096 on CUDA, 64,128,256 on CPU)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        why = f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device or driver"
        if args.device == "cuda":
            print(f"error: --device cuda: {why}; allowed: a machine with a CUDA GPU and a CUDA build of torch, "
                  "or --device auto|cpu", file=sys.stderr)
            sys.exit(2)
        print(f"no GPU: {why}; this is the CPU table (the GPU table: --device cuda on a GPU machine)")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    widths = [int(w) for w in (args.widths or ("1024,2048,4096" if device.type == "cuda" else "64,128,256")).split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    tensors = sum(1 for _ in setup(widths[0], device)[1].parameters())
    print(f"device: {name}; torch {torch.__version__}; MLP of {tensors} tensors, batch {BATCH}, {args.steps} steps, "
          f"median of {args.repeats}")
    cases = {"bare": lambda w: bare(w, args.steps, device),
             "telemetry": lambda w: telemetry(w, args.steps, device, 50),
             "sync=1": lambda w: telemetry(w, args.steps, device, 1)}
    print(f"{'width':>6} {'bare ms':>9} {'telemetry ms':>13} {'sync=1 ms':>10} {'overhead':>9} {'sync=1 overhead':>16}")
    for width in widths:
        for case in cases.values():  # warm-up: kernels, allocator, lazy imports
            case(width)
        times = {k: [] for k in cases}
        for _ in range(args.repeats):
            for key, case in cases.items():
                times[key].append(case(width))
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"{width:>6} {med['bare']:>9.2f} {med['telemetry']:>13.2f} {med['sync=1']:>10.2f} "
              f"{med['telemetry'] / med['bare'] - 1:>+9.1%} {med['sync=1'] / med['bare'] - 1:>+16.1%}", flush=True)
    if device.type == "cuda":
        print("sync debug mode:", sync_debug_check(widths[0], device))


if __name__ == "__main__":
    main()
