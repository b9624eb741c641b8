"""What the tuning tests train on (imported by those modules)."""

from __future__ import annotations

import itertools
from pathlib import Path

from tuning.data import pydoc_dialogues, tokenize_dialogues
from worker.checkpoint import make_random_checkpoint


def tuning_files(d: Path, tokenizer, seed: int) -> dict[str, Path]:
    """A 2-layer, 128-wide random base model in `d` and a small pydoc dialogue set split into train/val.

    Two heads: the reference package squeezes a 1-head time_state [1, N, N] to [N, N] and then fails on it."""
    base = make_random_checkpoint(d / "base.pth", n_layer=2, n_embd=128, seed=seed)
    ds = tokenize_dialogues(itertools.islice(pydoc_dialogues(max_chars=200), 40), tokenizer, "chat")
    train, val = ds.split(0.2, seed=0)
    train.save(d / "train.pt")
    val.save(d / "val.pt")
    return {"dir": d, "base": base, "train": d / "train.pt", "val": d / "val.pt"}
