"""Pieces of the training loop that hold no model: the schedule, the masked loss, document batches, RNG snapshots."""
from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tuning.data import Batch, TokenDataset

IGNORE = -100  # target of a padded position (F.cross_entropy's ignore_index): no loss, not counted as a token


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the masked targets (0 when there are none), and their count.
    logits (B, T, V); target, mask (B, T)."""
    return masked_mean_nll(logits, target, mask), int(mask.sum())


def masked_mean_nll(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """masked_loss's loss alone (no count read back: it also runs on meta tensors, for tuning.memory_plan)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
    m = mask.flatten().to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1)


def document_windows(ds: TokenDataset, ctx_len: int, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of whole dialogues from their first token, in a new shuffled order each epoch; (input, target, mask).

    A dialogue longer than ctx_len + 1 tokens is cut to its first ctx_len + 1; shorter ones are padded at the end,
    to the batch's longest, with input 0, target IGNORE and mask 0 (padding at the end never changes the causal
    model's outputs at real positions)."""
    n_docs = len(ds)
    if n_docs == 0:
        raise ValueError("the dataset has no dialogues")
    epoch = 0
    while True:
        order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        for s in range(0, n_docs - batch_size + 1, batch_size):  # full batches only: every step weighs the same
            docs = [ds.document(i) for i in order[s : s + batch_size]]
            width = min(ctx_len + 1, max(len(t) for t, _ in docs))
            tokens = torch.full((batch_size, width), IGNORE, dtype=torch.long)
            mask = torch.zeros(batch_size, width, dtype=torch.uint8)
            for r, (t, m) in enumerate(docs):
                t, m = t[:width], m[:width]
                tokens[r, : len(t)], mask[r, : len(m)] = t.long(), m
            yield tokens[:, :-1].clamp(min=0), tokens[:, 1:], mask[:, 1:]
        epoch += 1


def seed_everything(seed: int) -> None:
    """torch, Python and numpy generators from one seed."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_snapshot() -> dict[str, Any]:
    """Every generator a training step may draw from, to continue a run exactly."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back what `rng_snapshot` took."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
