"""The lm_spikes example in a plain PyTorch loop of your own, recorded through gradsweep.watch.

    PYTHONPATH=examples python examples/train_with_watch.py --lr 0.03 --clip zclip
"""
from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

import gradsweep
from gradsweep_examples.chargpt import CharGPT
from gradsweep_examples.stdlib_text import VOCAB_SIZE, make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--clip", default="zclip", help="none|norm|zclip|adagc|autoclip|agc")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-chars", type=int, default=200_000)
    ap.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    args = ap.parse_args()
    torch.manual_seed(0)
    train, dev, _ = make(train_chars=args.train_chars)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    model = CharGPT(vocab_size=VOCAB_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    clip = {"name": args.clip, **({"max_norm": 1.0} if args.clip == "norm" else {})}
    with gradsweep.watch(model, clip=clip, tracking_uri=args.tracking_uri, experiment_name="lm-watch",
                         run_name=f"{args.clip} lr={args.lr:g}", total_steps=len(loader) * args.epochs,
                         param_groups="depth:2") as gs:
        for _ in range(args.epochs):
            for x, y in loader:
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                loss.backward()
                gs.step(loss=loss)
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                x, y = dev.tensors
                gs.log_metrics({"dev/loss": F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()})
    print(f"run {gs.run_id} {gs.status}: gradsweep.history({gs.run_id!r}) has every step")


if __name__ == "__main__":
    main()
