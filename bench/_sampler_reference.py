"""The sampler as it was before the batch-vectorized rewrite (git 240519d, worker/sampler.py), kept as a reference.

Used only by bench/bench_sampler.py (old vs new in the same run) and tests/test_sampler.py (the new sampler must
give the same tokens for the same seeds, with ties in the new sampler's order). Not imported by the worker.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import torch

from worker.sampler import SampleResult, SamplingParams

__all__ = ["SamplerState", "sample_batch"]

_HEAD_SIZES = (64, 1024, 16384)
# torch.topk as it was; the tests swap in a top-k in worker.sampler's defined order of ties (equal values by lower
# id), the one change of behaviour since: the tokens must then match draw for draw, ties included.
topk = torch.topk


class SamplerState:
    """One request's sampling state: its parameters, its random generator and its decayed token counts."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)  # CPU: one uniform per step, any device
        # count(n) = _raw[n] * _scale. Decaying every count each step would be O(distinct tokens) of Python
        # per request per step; decaying the shared scale is O(1). Renormalised before it underflows.
        self._raw: dict[int, float] = {}
        self._scale = 1.0

    def counts(self) -> dict[int, float]:
        """Current decayed occurrence count per generated token."""
        return {token: raw * self._scale for token, raw in self._raw.items()}

    def penalties(self) -> tuple[list[int], list[float]]:
        """(token ids, amount to subtract from their logits) for this step."""
        p = self.params
        if not self._raw or (p.presence_penalty == 0 and p.frequency_penalty == 0):
            return [], []
        scaled_freq = p.frequency_penalty * self._scale
        return list(self._raw), [p.presence_penalty + raw * scaled_freq for raw in self._raw.values()]

    def observe(self, token_id: int) -> None:
        """Record a generated token: decay all counts, then count this one."""
        decay = self.params.penalty_decay
        if decay == 0:
            self._raw.clear()
            self._scale = 1.0
        else:
            self._scale *= decay
            if self._scale < 1e-150:
                self._raw = {t: r * self._scale for t, r in self._raw.items()}
                self._scale = 1.0
        self._raw[token_id] = self._raw.get(token_id, 0.0) + 1.0 / self._scale


def _rows(t: torch.Tensor, rows: torch.Tensor, n_total: int) -> torch.Tensor:
    """t[rows], without the copy when rows is every row in order."""
    return t if rows.numel() == n_total else t.index_select(0, rows)


def _draw(gens: Sequence[torch.Generator]) -> torch.Tensor:
    """One uniform in [0, 1) per request, each from that request's own generator."""
    return torch.tensor([torch.rand((), dtype=torch.float64, generator=g).item() for g in gens], dtype=torch.float64)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index whose cumulative weight first exceeds u * total; weights >= 0, each row > 0."""
    cdf = torch.cumsum(weights, dim=-1)  # (R, K)
    target = (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # (R, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)  # (R,)
    idx = idx.clamp_(max=weights.shape[1] - 1)
    # u * total can round up to total: then the clamp may land on a zero-weight tail; take the last real one.
    picked = weights.gather(1, idx.unsqueeze(1)).squeeze(1)
    bad = (picked <= 0).nonzero().flatten().tolist()
    for r in bad:
        idx[r] = int((weights[r] > 0).nonzero().max())
    return idx


def _sorted_head(
    x: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, the descending head of the vocab that holds every token kept by top-p/top-k.

    Returns (head logits (R, K), head ids (R, K), kept count per row (R,)), kept tokens being the first
    `kept` of the head: all tokens with prob >= the top-p cutoff value (ties included, as in the reference),
    then at most top_k of them.
    """
    n_rows, vocab = x.shape
    need_k = int(top_k.max()) if n_rows else 0
    out_vals: list[torch.Tensor | None] = [None] * n_rows
    out_ids: list[torch.Tensor | None] = [None] * n_rows
    kept = torch.zeros(n_rows, dtype=torch.long)
    pending = torch.arange(n_rows)
    for size in (*_HEAD_SIZES, vocab):
        size = min(vocab, max(size, need_k))
        xs = _rows(x, pending.to(x.device), n_rows)
        vals, ids = topk(xs, size, dim=-1, sorted=True)  # (P, size), descending
        probs = torch.exp(vals - lse.index_select(0, pending.to(x.device)).unsqueeze(1))
        p_col = top_p.index_select(0, pending).to(x.device).unsqueeze(1)
        cum = torch.cumsum(probs, dim=-1)
        reached = cum >= p_col
        any_reached = reached.any(dim=1)
        first = reached.to(torch.int8).argmax(dim=1)  # first position where the mass reaches top_p
        cutoff = probs.gather(1, first.unsqueeze(1))
        n_p = (probs >= cutoff).sum(dim=1)
        # Mass not reached inside this head: the cutoff lies further on (or, over the whole vocab, float
        # rounding kept the total just under top_p: no cut then). top_p == 1: no cut.
        cut_here = any_reached & (p_col.squeeze(1) < 1)
        n_p = torch.where(cut_here, n_p, torch.full_like(n_p, vocab))
        k_col = top_k.index_select(0, pending).to(x.device)
        n = torch.where(k_col > 0, torch.minimum(n_p, k_col), n_p)
        # Resolved when the kept set ends inside this head (if it fills the head, ties or more tokens may
        # follow beyond it), or when the head is already the whole vocab.
        done = (n < size) | (size == vocab)
        done_cpu = done.cpu()
        n_cpu = n.clamp(max=size).cpu()
        for j, r in enumerate(pending.tolist()):
            if done_cpu[j]:
                out_vals[r], out_ids[r], kept[r] = vals[j], ids[j], n_cpu[j]
        pending = pending[~done_cpu]
        if pending.numel() == 0:
            break
    width = max(int(v.shape[0]) for v in out_vals)  # type: ignore[union-attr]
    head_vals = x.new_full((n_rows, width), -math.inf)
    head_ids = torch.zeros((n_rows, width), dtype=torch.long, device=x.device)
    for r in range(n_rows):
        v, i = out_vals[r], out_ids[r]
        head_vals[r, : v.shape[0]] = v  # type: ignore[union-attr]
        head_ids[r, : i.shape[0]] = i  # type: ignore[union-attr]
    return head_vals, head_ids, kept


def sample_batch(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[SampleResult]:
    """Sample one token per row of `logits` (B, V) with each row's own parameters, and record it in its state.

    The reported logprob is log softmax of the logits after penalties and bans, before temperature, top-p
    and top-k: the model's own probability for the token, comparable across sampling settings.
    """
    if logits.dim() != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be (B, V) with B = {len(states)} states, got {tuple(logits.shape)}")
    n_rows, vocab = logits.shape
    if n_rows == 0:
        return []
    device = logits.device
    x = logits.float()

    # Penalties and bans as one sparse edit on a copy (the caller's logits stay untouched).
    pen_rows: list[int] = []
    pen_cols: list[int] = []
    pen_vals: list[float] = []
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for r, state in enumerate(states):
        cols, vals = state.penalties()
        pen_rows += [r] * len(cols)
        pen_cols += cols
        pen_vals += vals
        banned = [t for t in state.params.banned_tokens if t < vocab]  # ids past the sampled range can't be drawn
        ban_rows += [r] * len(banned)
        ban_cols += banned
    if pen_cols or ban_cols:
        x = x.clone()
        if pen_cols:
            idx = (torch.tensor(pen_rows, device=device), torch.tensor(pen_cols, device=device))
            x.index_put_(idx, -torch.tensor(pen_vals, dtype=torch.float32, device=device), accumulate=True)
        if ban_cols:
            idx = (torch.tensor(ban_rows, device=device), torch.tensor(ban_cols, device=device))
            x.index_put_(idx, torch.tensor(-math.inf, device=device))

    lse = torch.logsumexp(x, dim=-1)  # (B,) log partition of the penalised logits
    tokens = torch.empty(n_rows, dtype=torch.long, device=device)

    greedy, full, cut = [], [], []
    for r, state in enumerate(states):
        p = state.params
        if p.temperature == 0 or p.top_k == 1:
            greedy.append(r)
        elif p.top_p < 1 or 0 < p.top_k < vocab:
            cut.append(r)
        else:
            full.append(r)

    if greedy:
        rows = torch.tensor(greedy, device=device)
        tokens[rows] = _rows(x, rows, n_rows).argmax(dim=-1)

    if full:
        # probs ** (1/T) is proportional to exp((logit - max) / T); subtracting the max rather than the log
        # partition keeps the top weight at 1 so a small T cannot underflow a whole row to zero.
        rows = torch.tensor(full, device=device)
        temp = torch.tensor([states[r].params.temperature for r in full], device=device).unsqueeze(1)
        xs = _rows(x, rows, n_rows)
        weights = torch.exp((xs - xs.max(dim=1, keepdim=True).values) / temp)  # (R, V)
        tokens[rows] = _inverse_cdf(weights, _draw([states[r].generator for r in full]))

    if cut:
        rows = torch.tensor(cut, device=device)
        params = [states[r].params for r in cut]
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        top_k = torch.tensor([p.top_k if p.top_k < vocab else 0 for p in params], dtype=torch.long)
        head_vals, head_ids, kept = _sorted_head(_rows(x, rows, n_rows), lse[rows], top_p, top_k)
        temp = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        pos = torch.arange(head_vals.shape[1], device=device).unsqueeze(0)
        weights = torch.exp((head_vals - head_vals[:, :1]) / temp)  # (R, K); column 0 is the row max
        weights = torch.where(pos < kept.to(device).unsqueeze(1), weights, torch.zeros_like(weights))
        picked = _inverse_cdf(weights, _draw([states[r].generator for r in cut]))
        tokens[rows] = head_ids.gather(1, picked.unsqueeze(1)).squeeze(1)

    chosen_logprob = (x.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse).tolist()
    token_list = tokens.tolist()

    alternatives: dict[int, tuple[tuple[int, float], ...]] = {}
    want = [r for r, s in enumerate(states) if s.params.logprobs > 0]
    if want:
        rows = torch.tensor(want, device=device)
        k = max(states[r].params.logprobs for r in want)
        vals, ids = topk(_rows(x, rows, n_rows), k, dim=-1)
        vals = (vals - lse[rows].unsqueeze(1)).tolist()
        ids = ids.tolist()
        for j, r in enumerate(want):
            n = states[r].params.logprobs
            alternatives[r] = tuple(zip(ids[j][:n], vals[j][:n]))

    results = []
    for r, state in enumerate(states):
        state.observe(token_list[r])
        results.append(SampleResult(token_list[r], chosen_logprob[r], alternatives.get(r, ())))
    return results
