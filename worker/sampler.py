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

import json
import math
import secrets
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch

from common.sampling import check_sampling
from rwkv_serve.contract import MAX_LOGPROBS  # each alternative costs a top-k over the vocab
from worker import cpu_kernels
from worker.sampler_bank import _FREQUENCY, _PRESENCE, _TEMPERATURE, _TOP_K, _TOP_P, _attach, _Bank
from worker.stops import StopChecker, StopStep, StopStringMatcher  # re-exported: the engine imports them from here

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
    # {"json_schema": text} | {"regex": text} | {"lark_grammar": text}: the output is constrained to it (see
    # worker/constraints.py); None = free text. A json_schema given as a dict is kept as its JSON text.
    response_format: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        rf = self.response_format
        if isinstance(rf, Mapping) and len(rf) == 1 and not isinstance(rf.get("json_schema", ""), str):
            object.__setattr__(self, "response_format", {"json_schema": json.dumps(rf["json_schema"])})

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


def _head(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the `size` largest logits of each row of x (R, V) fp32, in one defined order: value
    descending, NaN first, equal values by lower id. torch.topk leaves the order of ties unspecified (it may change
    with the device, the shape or the release, and with it the token a seeded draw picks among tied ones).

    On CPU the native kernel (worker/csrc/topk.cpp, ~3x torch.topk at 64 of 65,536); elsewhere torch.topk,
    re-ordered inside the head: of values tied across the head's edge, the ones inside are torch's choice (which
    matters only when top_k cuts into such a tie)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu_kernels.available():
        return cpu_kernels.topk(x, size)
    if size == x.shape[1]:
        return torch.sort(x, dim=1, descending=True, stable=True)
    vals, ids = torch.topk(x, size, dim=1, sorted=True)
    ids, by_id = ids.sort(dim=1)
    vals, order = vals.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    return vals, ids.gather(1, order)


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
        vals, ids = _head(xs, size)  # (P, size), descending
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


_BIT_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds, for bit i of byte b, 0 where it is set and -inf where it is not."""
    key = (device, dtype)
    if key not in _BIT_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BIT_TABLES[key] = torch.where(bits.bool(), 0.0, -math.inf).to(device=device, dtype=dtype)
    return _BIT_TABLES[key]


def _apply_bitmask(x: torch.Tensor, rows: torch.Tensor, bits: torch.Tensor) -> None:
    """x[rows[i], j] = -inf where bit j of bitmask row bits[i] is 0 (llguidance's layout: bit j % 32 of int32 word
    j // 32), in place; columns past the bitmask's width are disallowed too. rows: ascending, no repeats.

    One lookup per mask byte (8 columns at a time, little-endian words as on x86/ARM hosts and CUDA) and one add:
    ~10x faster on CPU than unpacking every bit and masked_fill (1 ms vs 6-10 ms at B=16 over 65k tokens)."""
    n, vocab = rows.numel(), x.shape[1]
    table = _bit_table(x.device, x.dtype)
    add = table.index_select(0, bits.contiguous().view(torch.uint8).reshape(-1).int()).view(n, -1)  # (R, 32 W)
    if add.shape[1] < vocab:
        add = torch.cat([add, add.new_full((n, vocab - add.shape[1]), -math.inf)], 1)
    add = add[:, :vocab]
    if n == x.shape[0]:  # every row, in order
        x.add_(add)
    else:
        x.index_add_(0, rows, add)


def sample_batch(logits: torch.Tensor, states: Sequence[SamplerState],
                 mask: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[SampleResult]:
    """Sample one token per row of `logits` (B, V) with each row's own parameters, and record it in its state.

    `mask`: (rows, bitmask rows), the tokens a response_format allows for those rows (worker/constraints.py); the
    others get -inf first, before penalties, bans and the usual sampling. The reported logprob is log softmax of
    the logits after the mask, penalties and bans, before temperature, top-p and top-k: the model's own
    probability for the token under the constraint, comparable across sampling settings. A state may appear once
    per call.
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
        if mask is not None:
            x = bank.scratch(x).copy_(x)
            _apply_bitmask(x, *mask)
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
            if mask is None:
                x = bank.scratch(x).copy_(x)
            x = x.scatter_add_(1, torch.cat(cols, 1), torch.cat(adds, 1).to(x.dtype))

        exps = bank.scratch(x, 1)
        lse = _logsumexp(x, exps)  # (B,) log partition of the penalised logits; exps = exp(x - row max)
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
                if all(states[r].params.temperature == 1 for r in full):  # the same floats, already computed
                    weights = _rows(exps, f, n_rows)
                else:
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
            vals, ids = _head(_rows(x, w, n_rows), k)
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
