"""TokenDataset: tokenized dialogues in memory, their files (.pt, RWKV-LM binidx) and training windows."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

_FORMAT = "rwkv-serve-tuning-data"
_FORMAT_VERSION = 1
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(eq=False)
class TokenDataset:
    """Concatenated dialogues: tokens (int32), loss mask (uint8) and document offsets (int64, n_docs + 1)."""

    tokens: torch.Tensor  # (N,) int32: 65536 ids fit, int64 would double the file
    mask: torch.Tensor  # (N,) uint8: 1 where the token is a training target
    offsets: torch.Tensor  # (n_docs + 1,) int64: document i is tokens[offsets[i]:offsets[i + 1]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1 or self.mask.shape != self.tokens.shape:
            shapes = f"tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}"
            raise ValueError(f"{shapes}: must be 1-D and of equal length")
        o = self.offsets
        if o.dim() != 1 or len(o) < 1 or o[0] != 0 or o[-1] != len(self.tokens) or bool((o[1:] < o[:-1]).any()):
            raise ValueError("offsets must rise from 0 to len(tokens)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        """Total tokens, eos included."""
        return len(self.tokens)

    @property
    def num_trainable(self) -> int:
        """Tokens that are training targets."""
        return int(self.mask.sum())

    def document(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and mask of dialogue i."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.mask[a:b]

    # -- files --

    def save(self, path: str | Path) -> None:
        """Write a `.pt` file of plain tensors and a plain dict, loadable with weights_only=True."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION, **self.meta}
        torch.save({"tokens": self.tokens, "mask": self.mask, "offsets": self.offsets, "meta": meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> TokenDataset:
        """Read a file written by save()."""
        # weights_only: a data file must not be able to run code when opened.
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("meta", {}).get("format") != _FORMAT:
            raise ValueError(f"{path}: not a {_FORMAT} file")
        if obj["meta"].get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: version {obj['meta'].get('version')}, expected {_FORMAT_VERSION}")
        meta = {k: v for k, v in obj["meta"].items() if k not in ("format", "version")}
        return cls(obj["tokens"], obj["mask"], obj["offsets"], meta)

    def save_binidx(self, prefix: str | Path) -> None:
        """Write RWKV-LM's binidx pair (`prefix.bin`, `prefix.idx`); tokens only, the mask has no place there."""
        # Megatron MMapIndexedDataset layout, as read by RWKV-LM's src/binidx.py: one sequence per document.
        if self.num_tokens and (int(self.tokens.min()) < 0 or int(self.tokens.max()) > 0xFFFF):
            raise ValueError("binidx stores uint16 tokens; ids must lie in 0..65535")
        prefix = str(prefix)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens.numpy().astype("<u2").tofile(prefix + ".bin")
        offsets = self.offsets.numpy()
        sizes = np.diff(offsets).astype("<i4")
        pointers = (offsets[:-1] * 2).astype("<i8")  # byte offsets into .bin (2 bytes per uint16 token)
        doc_idx = np.arange(len(sizes) + 1, dtype="<i8")  # document boundaries in sequence numbers
        with open(prefix + ".idx", "wb") as f:
            f.write(b"MMIDIDX\x00\x00")
            f.write(struct.pack("<Q", 1))  # version
            f.write(struct.pack("<B", 8))  # dtype code 8 = uint16
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())

    # -- views for training --

    def _select(self, indices: list[int]) -> TokenDataset:
        """A new dataset holding the given documents, in the given order."""
        o = self.offsets.tolist()
        spans = [(o[i], o[i + 1]) for i in indices]
        sizes = torch.tensor([b - a for a, b in spans], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        tokens = torch.cat([self.tokens[a:b] for a, b in spans]) if spans else self.tokens[:0]
        mask = torch.cat([self.mask[a:b] for a, b in spans]) if spans else self.mask[:0]
        return TokenDataset(tokens, mask, offsets, dict(self.meta))

    def split(self, val_fraction: float, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
        """(train, val) by whole dialogues, so no dialogue leaks across; documents keep their order."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = len(self)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)  # a requested split gets at least one dialogue on each side
        # random.Random rather than torch.randperm: its sequence is stable across library versions.
        val = set(random.Random(seed).sample(range(n), n_val))
        train_idx = [i for i in range(n) if i not in val]
        return self._select(train_idx), self._select(sorted(val))

    def batches(
        self, ctx_len: int, batch_size: int, seed: int = 0, num_batches: int | None = None
    ) -> Iterator[Batch]:
        """Random training windows: (input, target, mask), each (B, T); target is input shifted by one."""
        # mask lines up with target (mask[b, t] says whether target[b, t] counts); a window may hold no
        # trainable target, so the loss should be divided by mask.sum().clamp(min=1).
        n = self.num_tokens
        if n < ctx_len + 1:
            raise ValueError(f"{n} tokens cannot fill a window of {ctx_len} + 1")
        g = torch.Generator().manual_seed(seed)
        span = torch.arange(ctx_len + 1)
        done = 0
        while num_batches is None or done < num_batches:
            starts = torch.randint(0, n - ctx_len, (batch_size,), generator=g)
            idx = starts[:, None] + span  # (B, T + 1)
            window, m = self.tokens[idx].long(), self.mask[idx]  # (B, T + 1)
            yield window[:, :-1], window[:, 1:], m[:, 1:]
            done += 1

    def eval_windows(self, ctx_len: int) -> Iterator[Batch]:
        """Consecutive non-overlapping (1, T) windows whose targets cover every token after the first once."""
        # Consecutive windows let a recurrent model carry its state across them; the last one may be shorter.
        n = self.num_tokens
        for s in range(0, n - 1, ctx_len):
            e = min(s + ctx_len, n - 1)
            x, y = self.tokens[None, s:e], self.tokens[None, s + 1 : e + 1]  # (1, T)
            yield x.long(), y.long(), self.mask[None, s + 1 : e + 1]
