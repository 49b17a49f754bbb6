"""The default job as a bare PyTorch script: the yardstick of benchmarks/startup_speed.py.

The same data (digit-sum files written by the benchmark), model (SRN: embedding 10x32, h_t =
tanh(x_t W + h_{t-1} U + b) with W, U, b at zero, linear 32->19), optimizer (SGD lr 0.2), batch 64,
summed cross-entropy, clip norm 20 and 250 steps as `python src/train.py`, written the way the
original study's script is: a DataLoader, the W/U/b gradient norms printed every step, no tracking,
no Hydra, no checkpoints. Run: python benchmarks/bare_srn.py <folder with train.txt dev.txt test.txt>
"""
import sys

import torch
from torch import nn


def load(path):
    xs, ys = [], []
    for line in open(path):
        seq, label = line.rstrip("\n").split("\t")
        xs.append([int(t) for t in seq.split()])
        ys.append(int(label))
    return torch.tensor(xs), torch.tensor(ys)


class SRN(nn.Module):
    def __init__(self, hidden=32, classes=19):
        super().__init__()
        self.embed = nn.Embedding(10, hidden)
        self.W = nn.Parameter(torch.zeros(hidden, hidden))
        self.U = nn.Parameter(torch.zeros(hidden, hidden))
        self.b = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        e = self.embed(x)
        h = torch.zeros(x.shape[0], self.W.shape[0])
        for t in range(x.shape[1]):
            h = torch.tanh(e[:, t] @ self.W + h @ self.U + self.b)
        return self.out(h)


def main(folder):
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the job (trainer.cpu_threads=1)
    train, dev = load(f"{folder}/train.txt"), load(f"{folder}/dev.txt")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=64, shuffle=True)
    model = SRN()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    step = 0
    for _epoch in range(50):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            loss.backward()
            norms = [p.grad.norm().item() for p in (model.W, model.U, model.b)]
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 20.0)
            opt.step()
            print(f"step {step} loss {loss.item():.4g} total {total.item():.4g} W {norms[0]:.4g} U {norms[1]:.4g} "
                  f"b {norms[2]:.4g}")
            step += 1
    with torch.no_grad():
        acc = (model(dev[0]).argmax(1) == dev[1]).float().mean().item()
    print(f"done: {step} steps, dev acc {acc:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
