"""The sampler's per-device bank: every live request's decayed token counts and parameters, one row each.

Read for a whole batch with one gather and updated with one scatter per step (worker/sampler.py sample_batch).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.sampler import SamplerState

_RENORM_BELOW = 1e-150  # a count is raw * scale; the scale is folded into the raw counts before it underflows

_PRESENCE, _FREQUENCY, _DECAY, _TEMPERATURE, _TOP_P, _TOP_K = range(6)


@dataclass
class _Rows:
    """One call's view of its states' bank rows (gathered once, used for penalties and the update)."""

    slots: torch.Tensor  # (B,) long, on the bank's device
    par: torch.Tensor  # (B, 6) float64
    ids: torch.Tensor  # (B, W) long: generated token ids, the first `length` valid
    raw: torch.Tensor  # (B, W) float64: raw counts (count = raw * scale)
    length: torch.Tensor  # (B,) long
    scale: torch.Tensor  # (B,) float64
    width: int


class _Bank:
    """Every live SamplerState's counts and parameters on one device, one row each.

    Counts are sparse: per row the ids of the tokens generated since the last clear (`length` of them, no
    repeats) and their raw counts; count = raw * scale. Decaying all counts is one multiply of the scale;
    it is folded into the raw counts (count = raw * scale kept exact in float64) before it underflows, as
    the per-request dict did. Rows of collected states come back through `_released` (a list append, safe
    from a finalizer on any thread) and are reset when handed out again.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._free: list[int] = []
        self._released: list[int] = []
        self._rows = 0
        self._scratch: list[torch.Tensor | None] = [None, None]
        self._alloc(rows=16, width=16, bans=1)

    def _alloc(self, rows: int, width: int, bans: int) -> None:
        """Grow to at least rows x width counts and `bans` bans per row, keeping what is there."""
        d = self.device
        old = getattr(self, "ids", None)
        ids = torch.zeros((rows, width), dtype=torch.long, device=d)
        raw = torch.zeros((rows, width), dtype=torch.float64, device=d)
        length = torch.zeros(rows, dtype=torch.long, device=d)
        scale = torch.ones(rows, dtype=torch.float64, device=d)
        par = torch.zeros((rows, 6), dtype=torch.float64, device=d)
        ban_ids = torch.zeros((rows, bans), dtype=torch.long, device=d)
        ban_n = torch.zeros(rows, dtype=torch.long, device=d)
        if old is not None:
            r, w, b = self._rows, self.ids.shape[1], self.ban_ids.shape[1]
            ids[:r, :w], raw[:r, :w], length[:r], scale[:r] = self.ids, self.raw, self.length, self.scale
            par[:r], ban_ids[:r, :b], ban_n[:r] = self.par, self.ban_ids, self.ban_n
        self._free += range(self._rows, rows)
        self._rows = rows
        self.ids, self.raw, self.length, self.scale = ids, raw, length, scale
        self.par, self.ban_ids, self.ban_n = par, ban_ids, ban_n

    def take(self, state: SamplerState) -> int:
        """A reset row holding `state`'s parameters (call with the lock held)."""
        while self._released:
            self._free.append(self._released.pop())
        bans = len(state._bans)
        if not self._free or bans > self.ban_ids.shape[1]:
            rows = self._rows * 2 if not self._free else self._rows
            self._alloc(rows, self.ids.shape[1], max(bans, self.ban_ids.shape[1]))
        slot = self._free.pop()
        p = state.params
        self.par[slot] = torch.tensor([p.presence_penalty, p.frequency_penalty, p.penalty_decay, p.temperature,
                                       p.top_p, p.top_k], dtype=torch.float64)
        self.length[slot] = 0
        self.scale[slot] = 1.0
        self.ban_n[slot] = bans
        if bans:
            self.ban_ids[slot, :bans] = torch.tensor(state._bans, dtype=torch.long)
        return slot

    def scratch(self, x: torch.Tensor, which: int = 0) -> torch.Tensor:
        """A buffer shaped like x, reused from call to call (a fresh 8 MiB tensor per step costs page faults on
        CPU: 2 ms, more than the arithmetic). Lock held; valid until the lock goes."""
        buf = self._scratch[which]
        if buf is None or buf.numel() < x.numel() or buf.dtype != x.dtype:
            buf = self._scratch[which] = torch.empty(x.numel(), dtype=x.dtype, device=self.device)
        return buf[: x.numel()].view(x.shape)

    def release(self, slot: int) -> None:
        self._released.append(slot)

    def row(self, slot: int) -> tuple[list[int], list[float], float]:
        """(ids, raw counts, scale) of one row."""
        with self.lock:
            n = int(self.length[slot])
            return self.ids[slot, :n].tolist(), self.raw[slot, :n].tolist(), float(self.scale[slot])

    def load(self, slot: int, ids: list[int], raw: list[float], scale: float) -> None:
        """Set one row's counts (a state moving here from another device's bank; lock held)."""
        n = len(ids)
        if n > self.ids.shape[1]:
            self._alloc(self._rows, max(n, 2 * self.ids.shape[1]), self.ban_ids.shape[1])
        self.ids[slot, :n] = torch.tensor(ids, dtype=torch.long)
        self.raw[slot, :n] = torch.tensor(raw, dtype=torch.float64)
        self.length[slot] = n
        self.scale[slot] = scale

    def read(self, states: Sequence[SamplerState], device: torch.device) -> _Rows:
        """Gather the states' rows, wide enough for each to gain one token this step (lock held)."""
        width = max(s._length for s in states) + 1
        if width > self.ids.shape[1]:
            self._alloc(self._rows, max(width, 2 * self.ids.shape[1]), self.ban_ids.shape[1])
        slots = torch.tensor([s._slot for s in states], dtype=torch.long).to(device)
        return _Rows(slots, self.par.index_select(0, slots), self.ids[:, :width].index_select(0, slots),
                     self.raw[:, :width].index_select(0, slots), self.length.index_select(0, slots),
                     self.scale.index_select(0, slots), width)

    def observe(self, rows: _Rows, tokens: torch.Tensor) -> torch.Tensor:
        """Per row: decay all counts, then count its token. Returns the new lengths (device). Lock held.

        The same float64 arithmetic, in the same order, as the per-request dict: scale *= decay; below
        _RENORM_BELOW, raw *= scale and scale = 1; decay 0 clears; then raw[token] += 1 / scale.
        """
        decay = rows.par[:, _DECAY]
        scale = rows.scale * decay
        clear = decay == 0
        renorm = (scale < _RENORM_BELOW) & ~clear
        raw = torch.where(renorm.unsqueeze(1), rows.raw * scale.unsqueeze(1), rows.raw)
        scale = torch.where(clear | renorm, torch.ones_like(scale), scale)
        length = torch.where(clear, torch.zeros_like(rows.length), rows.length)
        pos = torch.arange(rows.width, device=tokens.device)
        valid = pos.unsqueeze(0) < length.unsqueeze(1)
        match = valid & (rows.ids == tokens.unsqueeze(1))
        found = match.any(dim=1)
        at = torch.where(found, match.to(torch.int8).argmax(dim=1), length)  # its entry, or the next free one
        old = torch.where(found, raw.gather(1, at.unsqueeze(1)).squeeze(1), torch.zeros_like(scale))
        raw.scatter_(1, at.unsqueeze(1), (old + 1.0 / scale).unsqueeze(1))
        ids = rows.ids.scatter(1, at.unsqueeze(1), tokens.unsqueeze(1))
        length = length + (~found).to(length.dtype)
        w = rows.width
        self.raw[rows.slots, :w] = raw
        self.ids[rows.slots, :w] = ids
        self.length[rows.slots] = length
        self.scale[rows.slots] = scale
        return length


_banks: dict[torch.device, _Bank] = {}
_banks_lock = threading.Lock()


def _bank_for(device: torch.device) -> _Bank:
    bank = _banks.get(device)
    if bank is None:
        with _banks_lock:
            bank = _banks.setdefault(device, _Bank(device))
    return bank


def _attach(states: Sequence[SamplerState], device: torch.device) -> _Bank:
    """The device's bank, with a row there for every state (moving the counts of a state sampled elsewhere)."""
    bank = _bank_for(device)
    for state in states:
        if state._bank is bank:
            continue
        old, old_slot = state._bank, state._slot
        moved = old.row(old_slot) if old is not None else None
        with bank.lock:
            slot = bank.take(state)
            if moved is not None:
                bank.load(slot, *moved)
        if state._finalizer is not None:
            state._finalizer.detach()
        if old is not None:
            old.release(old_slot)
        state._bank, state._slot = bank, slot
        state._finalizer = weakref.finalize(state, bank.release, slot)
    return bank
