"""Batched token sampling with per-request parameters, as the RWKV tools do it, and stop detection for streams.

Per row, in the order of the reference `PIPELINE.sample_logits` / chat tools:
penalties (presence + decayed frequency) and bans on the logits -> softmax -> top-p cut -> top-k cut ->
probs ** (1 / temperature) -> draw. Temperature 0 (or top_k 1) is greedy: argmax of the penalised logits.

Two deliberate differences from the reference: top_p = 1 means "no cut" (the reference's float cumsum can
stay just below 1.0 and then keeps only the top token), and the draw is an inverse-CDF lookup with one
uniform number from the request's own generator, so a seed gives the same tokens whatever else is batched.

The whole batch is sampled in a few tensor operations on the logits' device: every live request's decayed
token counts and parameters are rows of a per-device `_Bank` (sparse: the ids of the tokens it generated and
their raw counts), read and updated with one gather and one scatter per step; penalties and bans are one
scatter_add on the logits; greedy, uncut and top-p/top-k rows are each one group of batched ops. Per-row Python
is O(1) bookkeeping: a slot number, a flag, the next uniform from a block drawn ahead from the request's
generator (the same numbers, in the same order, as one draw per step). For the same seeds the tokens are the
ones the per-row sampler before it gave (bench/_sampler_reference.py; tests/test_sampler.py checks it).
"""

from __future__ import annotations

import math
import secrets
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from common.sampling import check_sampling
from rwkv_serve.contract import MAX_LOGPROBS  # each alternative costs a top-k over the vocab

__all__ = [
    "MAX_LOGPROBS",
    "SamplingParams",
    "SamplerState",
    "SampleResult",
    "sample_batch",
    "StopStringMatcher",
    "StopChecker",
    "StopStep",
]

# Top-p/top-k need the head of each sorted row. A full sort of 65536 floats costs ~20x a top-64, and real
# models put the top_p mass in a few dozen tokens, so widen only for the rows that need it.
_HEAD_SIZES = (64, 1024, 16384)
_UNIFORM_BLOCK = 64  # uniforms drawn ahead per request: torch.rand(n) gives the same numbers as n draws of one
_RENORM_BELOW = 1e-150  # a count is raw * scale; the scale is folded into the raw counts before it underflows

@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = no nucleus cut
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per (decayed) occurrence
    penalty_decay: float = 0.996  # occurrence counts are multiplied by this after every step
    banned_tokens: tuple[int, ...] = ()
    stop_token_ids: tuple[int, ...] = (0,)  # id 0 is end of text in the World vocab
    stop_strings: tuple[str, ...] = ()
    max_tokens: int = 256
    seed: int | None = None  # None = a fresh random seed per request
    logprobs: int = 0  # top alternatives to report per token; the chosen token's logprob is always given

    def validate(self, vocab_size: int, max_tokens_limit: int | None = None) -> None:
        """Raise InvalidArgument (a ValueError) naming the first invalid field: common.sampling's one validator."""
        check_sampling({f.name: getattr(self, f.name) for f in fields(self)}, vocab_size=vocab_size,
                       max_tokens_limit=max_tokens_limit)


class SamplerState:
    """One request's sampling state: its parameters, its random generator and its decayed token counts.

    The counts live in a row of the per-device bank (see `_Bank`), taken when the state is first sampled or
    observed and given back when the state is garbage collected. A state is sampled by one thread at a time.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        # CPU: any device. Uniforms are drawn from it in blocks ahead of use (same sequence as one per step).
        self.generator = torch.Generator().manual_seed(self.seed)
        self._uniforms: list[float] = []
        self._next = 0
        p = params
        self._greedy = p.temperature == 0 or p.top_k == 1
        self._bans = tuple(dict.fromkeys(p.banned_tokens))
        self._bank: _Bank | None = None
        self._slot = -1
        self._finalizer: weakref.finalize | None = None
        self._length = 0  # distinct tokens counted (the bank's length for this row, as of the last step)

    def _uniform(self) -> float:
        """The next uniform in [0, 1) of this request's stream."""
        if self._next == len(self._uniforms):
            self._uniforms = torch.rand(_UNIFORM_BLOCK, dtype=torch.float64, generator=self.generator).tolist()
            self._next = 0
        u = self._uniforms[self._next]
        self._next += 1
        return u

    def counts(self) -> dict[int, float]:
        """Current decayed occurrence count per generated token."""
        if self._bank is None:
            return {}
        ids, raw, scale = self._bank.row(self._slot)
        return {t: r * scale for t, r in zip(ids, raw)}

    def penalties(self) -> tuple[list[int], list[float]]:
        """(token ids, amount to subtract from their logits) for this step."""
        p = self.params
        if self._bank is None or (p.presence_penalty == 0 and p.frequency_penalty == 0):
            return [], []
        ids, raw, scale = self._bank.row(self._slot)
        scaled_freq = p.frequency_penalty * scale
        return ids, [p.presence_penalty + r * scaled_freq for r in raw]

    def observe(self, token_id: int) -> None:
        """Record a generated token: decay all counts, then count this one (sample_batch does this itself)."""
        bank = _attach([self], torch.device("cpu") if self._bank is None else self._bank.device)
        with bank.lock:
            ctx = bank.read([self], bank.device)
            lengths = bank.observe(ctx, torch.tensor([token_id], device=bank.device))
            self._length = int(lengths[0])


@dataclass(frozen=True)
class SampleResult:
    """One sampled token with its log-probability and, if asked, the top alternatives."""

    token_id: int
    # log P(token) under softmax of the logits after penalties and bans, before temperature, top-p and top-k.
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = field(default=())  # (id, logprob), most likely first


# Parameter columns of the bank.
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


def _rows(t: torch.Tensor, rows: torch.Tensor, n_total: int) -> torch.Tensor:
    """t[rows], without the copy when rows is every row in order."""
    return t if rows.numel() == n_total else t.index_select(0, rows)


def _argmax(x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """x.argmax(dim=1) (the first index of the row max), from chunk maxima: ~5x faster than argmax on CPU."""
    n_rows, vocab = x.shape
    n = vocab // chunk
    parts = [x[:, : n * chunk].reshape(n_rows, n, chunk).amax(dim=2)] if n else []
    if vocab % chunk:
        parts.append(x[:, n * chunk :].amax(dim=1, keepdim=True))
    cmax = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    top = cmax.amax(dim=1, keepdim=True)
    start = (cmax == top).to(torch.int8).argmax(dim=1) * chunk  # the first chunk holding the max
    cols = (start.unsqueeze(1) + torch.arange(min(chunk, vocab), device=x.device)).clamp_(max=vocab - 1)
    return start + (x.gather(1, cols) == top).to(torch.int8).argmax(dim=1)


def _logsumexp(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(x, dim=1), bit for bit (its CPU and CUDA composite), with the exp in a reused buffer."""
    top = x.amax(dim=1, keepdim=True)
    top.masked_fill_(top.abs() == math.inf, 0)
    total = torch.sub(x, top, out=buf).exp_().sum(dim=1)
    return total.log_().add_(top.squeeze(1))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose cumulative weight first exceeds u * total; weights >= 0, each row > 0."""
    cdf = torch.cumsum(weights, dim=-1)  # (R, K)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (R, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (R,)
    idx = idx.clamp_(max=weights.shape[1] - 1)
    # u * total can round up to total: then the clamp may land on a zero-weight tail; take the last real one.
    bad = weights.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0
    if bool(bad.any()):
        pos = torch.arange(weights.shape[1], device=weights.device)
        last = torch.where(weights > 0, pos, -1).max(dim=1).values
        idx = torch.where(bad, last, idx)
    return idx


def _sample_cut(
    x: torch.Tensor, lse: torch.Tensor, par: torch.Tensor, u: torch.Tensor, need_k: int
) -> torch.Tensor:
    """Tokens for rows with a top-p and/or top-k cut: per row, the descending head of the vocab that holds every
    kept token (all tokens with prob >= the top-p cutoff value, ties included as in the reference, then at most
    top_k of them), weighted probs ** (1 / T), one inverse-CDF draw. Rows whose kept set fills the head move
    on to a wider one; each width is one batch of ops.
    """
    n_rows, vocab = x.shape
    top_p = par[:, _TOP_P].float()
    top_k = par[:, _TOP_K].long()
    top_k = torch.where(top_k < vocab, top_k, torch.zeros_like(top_k))
    temp = par[:, _TEMPERATURE].float()
    tokens = torch.empty(n_rows, dtype=torch.long, device=x.device)
    pending = torch.arange(n_rows, device=x.device)
    for size in (*_HEAD_SIZES, vocab):
        size = min(vocab, max(size, need_k))
        every = pending.numel() == n_rows
        xs = x if every else x.index_select(0, pending)
        vals, ids = torch.topk(xs, size, dim=-1, sorted=True)  # (P, size), descending
        probs = torch.exp(vals - (lse if every else lse.index_select(0, pending)).unsqueeze(1))
        p_col = top_p if every else top_p.index_select(0, pending)
        cum = torch.cumsum(probs, dim=-1)
        reached = cum >= p_col.unsqueeze(1)
        any_reached = reached.any(dim=1)
        first = reached.to(torch.int8).argmax(dim=1)  # first position where the mass reaches top_p
        cutoff = probs.gather(1, first.unsqueeze(1))
        n_p = (probs >= cutoff).sum(dim=1)
        # Mass not reached inside this head: the cutoff lies further on (or, over the whole vocab, float
        # rounding kept the total just under top_p: no cut then). top_p == 1: no cut.
        cut_here = any_reached & (p_col < 1)
        n_p = torch.where(cut_here, n_p, torch.full_like(n_p, vocab))
        k_col = top_k if every else top_k.index_select(0, pending)
        n = torch.where(k_col > 0, torch.minimum(n_p, k_col), n_p)
        # Resolved when the kept set ends inside this head (if it fills the head, ties or more tokens may
        # follow beyond it), or when the head is already the whole vocab.
        done = (n < size) | (size == vocab)
        all_done = size == vocab or bool(done.all())
        if not all_done:
            sel = done.nonzero().squeeze(1)
            vals, ids, n = vals.index_select(0, sel), ids.index_select(0, sel), n.index_select(0, sel)
            rows = pending.index_select(0, sel)
        else:
            rows = pending
        if rows.numel():
            t_col = temp if rows.numel() == n_rows else temp.index_select(0, rows)
            weights = torch.exp((vals - vals[:, :1]) / t_col.unsqueeze(1))  # column 0 is the row max
            pos = torch.arange(size, device=x.device).unsqueeze(0)
            weights = torch.where(pos < n.clamp(max=size).unsqueeze(1), weights, torch.zeros_like(weights))
            picked = _inverse_cdf(weights, u if rows.numel() == n_rows else u.index_select(0, rows))
            tokens[rows] = ids.gather(1, picked.unsqueeze(1)).squeeze(1)
        if all_done:
            break
        pending = pending[~done]
    return tokens


def sample_batch(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[SampleResult]:
    """Sample one token per row of `logits` (B, V) with each row's own parameters, and record it in its state.

    The reported logprob is log softmax of the logits after penalties and bans, before temperature, top-p
    and top-k: the model's own probability for the token, comparable across sampling settings. A state may
    appear once per call.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be (B, V) with B = {len(states)} states, got {tuple(logits.shape)}")
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return []
    if len({id(s) for s in states}) != n_rows:
        raise ValueError("a SamplerState appears more than once in the batch")
    device = logits.device
    bank = _attach(states, device)
    x = logits.float()
    with bank.lock:
        rows = bank.read(states, device)
        # Penalties and bans: one scatter_add on a copy (the caller's logits stay untouched). Entries past a
        # row's length add -0.0 to column 0 (no change); bans add -inf. Same float64 arithmetic as per request.
        penalised = any(s.params.presence_penalty != 0 or s.params.frequency_penalty != 0 for s in states)
        banned = any(s._bans for s in states)
        if (penalised and any(s._length for s in states)) or banned:
            cols, adds = [], []
            if penalised:
                valid = torch.arange(rows.width, device=device).unsqueeze(0) < rows.length.unsqueeze(1)
                valid &= rows.ids < vocab
                scaled_freq = rows.par[:, _FREQUENCY] * rows.scale
                pen = rows.par[:, _PRESENCE].unsqueeze(1) + rows.raw * scaled_freq.unsqueeze(1)
                cols.append(torch.where(valid, rows.ids, 0))
                adds.append(torch.where(valid, -pen.float(), -0.0))
            if banned:
                ban_ids = bank.ban_ids.index_select(0, rows.slots)
                ban_n = bank.ban_n.index_select(0, rows.slots)
                pos = torch.arange(ban_ids.shape[1], device=device).unsqueeze(0)
                valid = (pos < ban_n.unsqueeze(1)) & (ban_ids < vocab)  # ids past the sampled range can't be drawn
                cols.append(torch.where(valid, ban_ids, 0))
                adds.append(torch.where(valid, -math.inf, -0.0))
            x = bank.scratch(x).copy_(x).scatter_add_(1, torch.cat(cols, 1), torch.cat(adds, 1).to(x.dtype))

        lse = _logsumexp(x, bank.scratch(x, 1))  # (B,) log partition of the penalised logits
        greedy: list[int] = []
        full: list[int] = []
        cut: list[int] = []
        for r, s in enumerate(states):
            (greedy if s._greedy else cut if s.params.top_p < 1 or 0 < s.params.top_k < vocab else full).append(r)
        if len(greedy) == n_rows:
            tokens = _argmax(x)
        else:
            tokens = torch.empty(n_rows, dtype=torch.long, device=device)
            draws = torch.tensor([states[r]._uniform() for r in full + cut], dtype=torch.float64).to(device)
            if greedy:
                g = torch.tensor(greedy, device=device)
                tokens[g] = _argmax(_rows(x, g, n_rows))
            if full:
                # probs ** (1/T) is proportional to exp((logit - max) / T); subtracting the max rather than the log
                # partition keeps the top weight at 1 so a small T cannot underflow a whole row to zero.
                f = torch.tensor(full, device=device)
                xs = _rows(x, f, n_rows)
                temp = rows.par.index_select(0, f)[:, _TEMPERATURE].float().unsqueeze(1)
                weights = torch.exp((xs - xs.amax(dim=1, keepdim=True)) / temp)  # (R, V)
                tokens[f] = _inverse_cdf(weights, draws[: len(full)])
            if cut:
                c = torch.tensor(cut, device=device)
                need_k = max(k if (k := states[r].params.top_k) < vocab else 0 for r in cut)
                tokens[c] = _sample_cut(_rows(x, c, n_rows), lse.index_select(0, c), rows.par.index_select(0, c),
                                        draws[len(full):], need_k)
        lengths = bank.observe(rows, tokens)
        # x may be the bank's scratch buffer: done with it before the lock goes.
        chosen_logprob = x.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
        packed = torch.stack([tokens.double(), chosen_logprob.double(), lengths.double()]).tolist()  # one transfer
        token_list = [int(t) for t in packed[0]]
        chosen = packed[1]

        alternatives: dict[int, tuple[tuple[int, float], ...]] = {}
        want = [r for r, s in enumerate(states) if s.params.logprobs > 0]
        if want:
            w = torch.tensor(want, device=device)
            k = max(states[r].params.logprobs for r in want)
            vals, ids = torch.topk(_rows(x, w, n_rows), k, dim=-1)
            vals = (vals - lse.index_select(0, w).unsqueeze(1)).tolist()
            ids = ids.tolist()
            for j, r in enumerate(want):
                n = states[r].params.logprobs
                alternatives[r] = tuple(zip(ids[j][:n], vals[j][:n]))

    results = []
    for r, state in enumerate(states):
        state._length = int(packed[2][r])
        results.append(SampleResult(token_list[r], chosen[r], alternatives.get(r, ())))
    return results


class StopStringMatcher:
    """Streams text, holding back anything that may still become a stop string; cuts at the first one."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self.stopped = False

    def _earliest_partial(self, text: str) -> int:
        """Smallest i such that text[i:] is a proper prefix of some stop string (len(text) if none)."""
        best = len(text)
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    best = min(best, len(text) - n)
                    break
        return best

    def push(self, text: str) -> str:
        """Text that can safely be shown; sets `stopped` once a stop string is certain to come first."""
        if self.stopped:
            raise RuntimeError("push after a stop string was found")
        held = self._held + text
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        partial = self._earliest_partial(held)
        if found:
            first = min(found)
            # A longer stop string that started earlier and is still incomplete could yet match first (stop
            # strings "abc" and "b" on "ab"): the cut point is only certain when no such prefix is pending.
            if partial >= first:
                self._held = ""
                self.stopped = True
                return held[:first]
        self._held = held[partial:]
        return held[:partial]

    def flush(self) -> str:
        """The held text at the end of generation, cut at a stop string if one is complete in it."""
        held, self._held = self._held, ""
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            return held[: min(found)]
        return held


class _Tokenizer(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class StopStep:
    """What one generated token adds to the stream, and whether generation ends here."""

    text: str
    reason: str | None = None  # 'stop_token', 'stop_string', 'max_tokens' or None (go on)

    @property
    def finished(self) -> bool:
        return self.reason is not None


class StopChecker:
    """Per request: turns generated ids into stream text and decides when and why generation stops."""

    def __init__(
        self,
        tokenizer: _Tokenizer,
        *,
        stop_token_ids: Sequence[int] = (0,),
        stop_strings: Sequence[str] = (),
        max_tokens: int = 256,
    ) -> None:
        from worker.tokenizer import IncrementalDecoder  # noqa: PLC0415 - keeps the sampler importable alone

        self._decoder = IncrementalDecoder(tokenizer)  # type: ignore[arg-type]
        self._matcher = StopStringMatcher(stop_strings)
        self._stop_ids = frozenset(stop_token_ids)
        self._max_tokens = max_tokens
        self.tokens_seen = 0
        self.reason: str | None = None

    @classmethod
    def from_params(cls, params: SamplingParams, tokenizer: _Tokenizer) -> StopChecker:
        return cls(tokenizer, stop_token_ids=params.stop_token_ids, stop_strings=params.stop_strings,
                   max_tokens=params.max_tokens)

    def _end(self, text: str, reason: str) -> StopStep:
        # Generation is over: release held bytes and held text, still cutting at a stop string in them.
        if not self._matcher.stopped:
            text += self._matcher.push(self._decoder.flush())
        if not self._matcher.stopped:
            text += self._matcher.flush()
        self.reason = "stop_string" if self._matcher.stopped else reason
        return StopStep(text, self.reason)

    def step(self, token_id: int) -> StopStep:
        """Account for one generated token."""
        if self.reason is not None:
            raise RuntimeError(f"generation already stopped ({self.reason})")
        self.tokens_seen += 1
        if token_id in self._stop_ids:  # the stop token itself is not part of the text
            return self._end("", "stop_token")
        text = self._matcher.push(self._decoder.push(token_id))
        if self._matcher.stopped:
            self.reason = "stop_string"
            return StopStep(text, self.reason)
        if self.tokens_seen >= self._max_tokens:
            return self._end(text, "max_tokens")
        return StopStep(text)

    def finish(self, reason: str = "cancelled") -> StopStep:
        """End early for a reason outside the checker (cancelled, context full): emit what is held."""
        if self.reason is not None:
            return StopStep("", self.reason)
        return self._end("", reason)
