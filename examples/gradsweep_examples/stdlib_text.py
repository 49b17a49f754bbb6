"""Text that ships with every Python: the standard library's own .py sources (no download), split by
file into train/dev/test, as next-character windows for a language model."""
from __future__ import annotations

import functools
import sysconfig
import zlib
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

#: printable ASCII, newline and tab; anything else is one "unknown" id (97)
VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
UNKNOWN = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
_IDS = {ch: i for i, ch in enumerate(VOCAB)}


def sources() -> list[Path]:
    """The standard library's .py files (not site-packages, not tests), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)


def encode(text: str) -> torch.Tensor:
    return torch.tensor([_IDS.get(ch, UNKNOWN) for ch in text], dtype=torch.long)


@functools.lru_cache(maxsize=4)  # the jobs of a sweep in one process read the sources once
def make(context: int = 64, train_chars: int = 300_000, eval_chars: int = 30_000, dev_percent: int = 10,
         test_percent: int = 10):
    """(train, dev, test) TensorDatasets of (x, y) windows of ``context`` characters, y = x shifted by
    one. A file goes to one split by a hash of its path, so no file is in two; each split takes files
    in order until it has its characters."""
    want = {"train": train_chars, "dev": eval_chars, "test": eval_chars}
    texts: dict[str, list[str]] = {s: [] for s in want}
    have = dict.fromkeys(want, 0)
    for path in sources():
        bucket = zlib.crc32(str(path.relative_to(path.parents[len(path.parents) - 1])).encode()) % 100
        split = "dev" if bucket < dev_percent else "test" if bucket < dev_percent + test_percent else "train"
        if have[split] >= want[split]:
            if all(have[s] >= want[s] for s in want):
                break
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts[split].append(text)
        have[split] += len(text)
    out = []
    for split in ("train", "dev", "test"):
        ids = encode("\n".join(texts[split]))[:want[split] + 1]
        n = (len(ids) - 1) // context
        x = ids[:n * context].view(n, context)
        y = ids[1:n * context + 1].view(n, context)
        out.append(TensorDataset(x, y))
    return tuple(out)
