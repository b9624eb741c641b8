"""Sampler: greedy/seeded/batched draws, cuts, penalties, validation; stop tokens and stop strings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.sampler import (
    SamplerState,
    SamplingParams,
    StopChecker,
    StopStringMatcher,
    sample_batch,
)
from worker.tokenizer import WorldTokenizer

HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _logits(b: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def _run(params: list[SamplingParams], steps: int, v: int = 2000) -> list[list[int]]:
    """Tokens per row over `steps` batched steps with fresh states (logits differ per step)."""
    states = [SamplerState(p) for p in params]
    out: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        logits = _logits(len(params), v, seed=step)
        for r, res in enumerate(sample_batch(logits, states)):
            out[r].append(res.token_id)
    return out


def test_greedy_is_argmax_and_logprob_is_log_softmax() -> None:
    logits = _logits(8, 5000)
    before = logits.clone()
    results = sample_batch(logits, [SamplerState(SamplingParams(temperature=0)) for _ in range(8)])
    assert [r.token_id for r in results] == logits.argmax(dim=1).tolist()
    expected = torch.log_softmax(logits, dim=1).max(dim=1).values
    assert torch.allclose(torch.tensor([r.logprob for r in results]), expected, atol=1e-5)
    assert torch.equal(logits, before)  # the caller's logits are not edited in place


def test_top_k_one_and_tiny_temperature_equal_greedy() -> None:
    greedy = _run([SamplingParams(temperature=0)] * 4, steps=5)
    assert _run([SamplingParams(top_k=1, seed=i) for i in range(4)], steps=5) == greedy
    # A tiny temperature must not underflow every weight to zero.
    assert _run([SamplingParams(temperature=1e-6, seed=i) for i in range(4)], steps=5) == greedy


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    for extra in ({}, {"top_p": 0.9}, {"top_k": 50, "temperature": 1.5}):
        a = _run([SamplingParams(seed=123, **extra)], steps=30)
        b = _run([SamplingParams(seed=123, **extra)], steps=30)
        c = _run([SamplingParams(seed=124, **extra)], steps=30)
        assert a == b
        assert a != c


def test_unseeded_requests_get_distinct_recorded_seeds() -> None:
    s1, s2 = SamplerState(SamplingParams()), SamplerState(SamplingParams())
    assert s1.seed != s2.seed
    assert SamplerState(SamplingParams(seed=7)).seed == 7


def test_batch_equals_rows_run_alone() -> None:
    params = [
        SamplingParams(temperature=0),
        SamplingParams(seed=1),
        SamplingParams(seed=2, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5, banned_tokens=(0,)),
        SamplingParams(seed=3, top_k=20, temperature=0.7, logprobs=3),
        SamplingParams(seed=4, top_p=0.5, top_k=5, frequency_penalty=1.0, penalty_decay=0.9),
        SamplingParams(temperature=0, presence_penalty=2.0),
        SamplingParams(seed=5, temperature=2.0, top_p=0.99),
    ]
    v = 3000
    batch_states = [SamplerState(p) for p in params]
    alone_states = [SamplerState(p) for p in params]
    for step in range(12):
        logits = _logits(len(params), v, seed=100 + step, scale=2.0)
        batched = sample_batch(logits, batch_states)
        for r, state in enumerate(alone_states):
            alone = sample_batch(logits[r : r + 1].clone(), [state])[0]
            assert alone.token_id == batched[r].token_id
            assert math.isclose(alone.logprob, batched[r].logprob, abs_tol=1e-5)
            assert [t for t, _ in alone.top_logprobs] == [t for t, _ in batched[r].top_logprobs]


def test_banned_tokens_are_never_sampled() -> None:
    logits = _logits(1, 100, scale=1.0).repeat(500, 1)
    banned = tuple(logits[0].topk(10).indices.tolist())
    states = [SamplerState(SamplingParams(seed=i, temperature=3.0, banned_tokens=banned)) for i in range(500)]
    tokens = {r.token_id for r in sample_batch(logits, states)}
    assert not tokens & set(banned)
    greedy = sample_batch(logits[:1], [SamplerState(SamplingParams(temperature=0, banned_tokens=banned))])[0]
    assert greedy.token_id == logits[0].topk(11).indices[-1].item()
    assert greedy.logprob == float("-inf") or greedy.logprob < 0


def test_penalties_exact_example() -> None:
    # Zero logits, so every change in the distribution comes from the penalties.
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=1.0, penalty_decay=0.5, logprobs=4)
    state = SamplerState(params)
    state.observe(2)  # counts: {2: 1}
    state.observe(2)  # {2: 0.5} then +1 -> {2: 1.5}
    state.observe(1)  # {2: 0.75, 1: 1}
    assert state.counts() == pytest.approx({2: 0.75, 1: 1.0})
    pen = {2: 0.5 + 0.75 * 1.0, 1: 0.5 + 1.0 * 1.0}
    res = sample_batch(torch.zeros(1, 4), [state])[0]
    z = 2 + math.exp(-pen[1]) + math.exp(-pen[2])
    expected = {0: -math.log(z), 3: -math.log(z), 1: -pen[1] - math.log(z), 2: -pen[2] - math.log(z)}
    assert res.token_id == 0  # argmax ties go to the lowest id
    assert dict(res.top_logprobs) == pytest.approx(expected, abs=1e-6)
    assert res.logprob == pytest.approx(expected[0], abs=1e-6)
    # sample_batch recorded the chosen token: everything decayed once more, then token 0 counted.
    assert state.counts() == pytest.approx({2: 0.375, 1: 0.5, 0: 1.0})


def test_penalty_decay_extremes() -> None:
    keep = SamplerState(SamplingParams(penalty_decay=1.0))
    forget = SamplerState(SamplingParams(penalty_decay=0.0))
    for token in (5, 5, 6):
        keep.observe(token)
        forget.observe(token)
    assert keep.counts() == {5: 2.0, 6: 1.0}
    assert forget.counts() == {6: 1.0}
    long = SamplerState(SamplingParams(penalty_decay=0.9))
    for _ in range(5000):  # the shared scale is renormalised long before it underflows
        long.observe(1)
    assert long.counts()[1] == pytest.approx(1 / (1 - 0.9))


def _frequencies(probs: list[float], params: SamplingParams, n: int = 4000) -> list[float]:
    logits = torch.log(torch.tensor(probs)).repeat(n, 1)
    states = [SamplerState(SamplingParams(**{**params.__dict__, "seed": i})) for i in range(n)]
    counts = [0] * len(probs)
    for r in sample_batch(logits, states):
        counts[r.token_id] += 1
    return [c / n for c in counts]


def _close(freq: list[float], expected: list[float], n: int = 4000) -> bool:
    return all(abs(f - e) <= 5 * math.sqrt(max(e * (1 - e), 1e-9) / n) + 1e-9 for f, e in zip(freq, expected))


def test_sampling_follows_softmax_temperature_top_p_top_k() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert _close(_frequencies(probs, SamplingParams()), probs)
    sq = [p * p for p in probs]
    assert _close(_frequencies(probs, SamplingParams(temperature=0.5)), [p / sum(sq) for p in sq])
    # top_p 0.6: the mass reaches 0.6 at the 2nd token, so the cutoff is 0.3 and tokens 0 and 1 stay.
    assert _close(_frequencies(probs, SamplingParams(top_p=0.6)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert _close(_frequencies(probs, SamplingParams(top_k=3)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert _close(_frequencies(probs, SamplingParams(top_p=0.9, top_k=2)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # As in the reference, every token tied with the cutoff probability stays.
    ties = [0.4, 0.2, 0.2, 0.2]
    assert _close(_frequencies(ties, SamplingParams(top_p=0.5)), ties)


def test_top_p_on_a_flat_vocab_widens_the_head() -> None:
    # Near-uniform logits (a random-init model): the top_p mass needs far more than the first head.
    logits = _logits(4, 65536, seed=9, scale=0.05)
    states = [SamplerState(SamplingParams(seed=i, top_p=0.4)) for i in range(4)]
    probs = torch.softmax(logits, dim=1)
    sorted_p = probs.sort(dim=1, descending=True).values
    first = (sorted_p.cumsum(dim=1) >= 0.4).int().argmax(dim=1)
    cutoff = sorted_p.gather(1, first.unsqueeze(1)).squeeze(1)
    for step in range(3):
        for r, res in enumerate(sample_batch(logits, states)):
            assert probs[r, res.token_id] >= cutoff[r]
    assert int(first.min()) > 1024  # the case really needed the wider heads


def test_logprobs_alternatives() -> None:
    logits = _logits(3, 500)
    states = [SamplerState(SamplingParams(seed=1, logprobs=n)) for n in (0, 1, 5)]
    results = sample_batch(logits, states)
    logp = torch.log_softmax(logits, dim=1)
    assert results[0].top_logprobs == ()
    for r, n in ((1, 1), (2, 5)):
        top = logp[r].topk(n)
        assert [t for t, _ in results[r].top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in results[r].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert results[r].logprob == pytest.approx(logp[r, results[r].token_id].item(), abs=1e-5)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="states"):
        sample_batch(torch.zeros(2, 10), [SamplerState(SamplingParams())])
    assert sample_batch(torch.zeros(0, 10), []) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"penalty_decay": 1.1}, "penalty_decay"),
        ({"penalty_decay": -0.1}, "penalty_decay"),
        ({"penalty_decay": float("nan")}, "penalty_decay"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"banned_tokens": (100,)}, "banned_tokens"),
        ({"banned_tokens": (-1,)}, "banned_tokens"),
        ({"banned_tokens": tuple(range(100))}, "whole vocabulary"),
        ({"stop_token_ids": (100,)}, "stop_token_ids"),
        ({"stop_strings": ("",)}, "stop_strings"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
    ],
)
def test_validate_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs).validate(vocab_size=100, max_tokens_limit=4096)


def test_validate_accepts_good_values() -> None:
    SamplingParams().validate(vocab_size=65536)
    SamplingParams(temperature=0, top_p=1.0, top_k=0, penalty_decay=0.0, max_tokens=4096, seed=2**64 - 1,
                   banned_tokens=(0,), stop_strings=("\n\n",), logprobs=20).validate(65536, max_tokens_limit=4096)


# --- stop strings -------------------------------------------------------------------------------------------

def _truncate(text: str, stops: list[str]) -> tuple[str, bool]:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


@st.composite
def _text_and_stops(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """Stop strings over a tiny alphabet, and a text made mostly of their fragments, cut into pieces."""
    alphabet = "abc"  # few letters: stop strings overlap and nest often
    stops = draw(st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3))
    fragments = [s[i:j] for s in stops for i in range(len(s)) for j in range(i + 1, len(s) + 1)]
    if fragments and draw(st.booleans()):  # a stop string inside another is the tricky case
        stops.append(draw(st.sampled_from(fragments)))
    atoms = st.text(alphabet, max_size=2)
    if stops:
        atoms = atoms | st.sampled_from(fragments) | st.sampled_from(stops)
    text = "".join(draw(st.lists(atoms, max_size=8)))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])], stops


@settings(HYPOTHESIS, max_examples=1500)
@given(_text_and_stops())
def test_stop_strings_stream_equals_truncated_text(case: tuple[list[str], list[str]]) -> None:
    pieces, stops = case
    matcher = StopStringMatcher(stops)
    out = ""
    for piece in pieces:
        out += matcher.push(piece)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    expected, stopped = _truncate("".join(pieces), stops)
    assert out == expected
    assert matcher.stopped == stopped


def test_stop_string_held_back_until_resolved() -> None:
    matcher = StopStringMatcher(["\n\nUser"])
    assert matcher.push("Hello\n") == "Hello"
    assert matcher.push("\nUs") == ""
    assert matcher.push("ually") == "\n\nUsually"
    assert matcher.push(" done\n\nUser: x") == " done" and matcher.stopped


def test_overlapping_stop_strings_wait_for_the_earlier_one() -> None:
    matcher = StopStringMatcher(["abc", "b"])
    assert matcher.push("ab") == "" and not matcher.stopped  # "abc" may still start at 0
    assert matcher.push("c") == "" and matcher.stopped


@pytest.fixture(scope="module")
def tok() -> WorldTokenizer:
    return WorldTokenizer()


_STOP_WORDS = ["\n\n", "User", "ser:", "中", "\ufffd!"]


@HYPOTHESIS
@given(
    ids=st.lists(st.sampled_from([0, 261, 11, 3301, 33, 5]) | st.integers(1, 256) | st.integers(257, 65529),
                 max_size=40),
    stops=st.lists(st.sampled_from(_STOP_WORDS), max_size=3),
    max_tokens=st.integers(1, 50),
)
def test_stop_checker_on_tokens(tok: WorldTokenizer, ids: list[int], stops: list[str], max_tokens: int) -> None:
    checker = StopChecker(tok, stop_token_ids=(0,), stop_strings=stops, max_tokens=max_tokens)
    out, consumed, reason = "", [], None
    for token in ids:
        step = checker.step(token)
        out += step.text
        consumed.append(token)
        if step.finished:
            reason = step.reason
            break
    if reason is None:
        step = checker.finish()
        out += step.text
        reason = step.reason
    text_ids = [t for t in consumed if t != 0]
    expected, stopped = _truncate(tok.decode(text_ids), stops)
    assert out == expected
    if stopped:
        assert reason == "stop_string"
    elif consumed and consumed[-1] == 0:
        assert reason == "stop_token"
    elif len(consumed) == max_tokens:
        assert reason == "max_tokens"
    else:
        assert reason == "cancelled"
    assert len(consumed) <= max_tokens
    with pytest.raises(RuntimeError):
        checker.step(261)


def test_stop_checker_basic_flow(tok: WorldTokenizer) -> None:
    ids = tok.encode("Hi there\n\nUser: more")
    checker = StopChecker.from_params(SamplingParams(stop_strings=("\n\nUser",), max_tokens=100), tok)
    steps = []
    for i in ids:
        steps.append(checker.step(i))
        if steps[-1].finished:
            break
    assert "".join(s.text for s in steps) == "Hi there"
    assert steps[-1].reason == "stop_string" and len(steps) < len(ids)
    checker = StopChecker(tok, max_tokens=2)
    assert [s.reason for s in (checker.step(ids[0]), checker.step(ids[1]))] == [None, "max_tokens"]
    checker = StopChecker(tok)
    assert checker.step(0).reason == "stop_token"


# --- the batch-vectorized sampler against the per-row one it replaced, and its pieces --------------------------

def _topk_ties_by_id(x: torch.Tensor, k: int, dim: int = -1, sorted: bool = True):
    """torch.topk in worker.sampler's order: value descending, equal values by lower id (a stable full sort)."""
    vals, ids = torch.sort(x, dim=dim, descending=True, stable=True)
    return vals.narrow(dim, 0, k), ids.narrow(dim, 0, k)


def test_same_tokens_logprobs_and_counts_as_the_per_row_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from bench import _sampler_reference as old

    monkeypatch.setattr(old, "topk", _topk_ties_by_id)  # the one change since: ties in a defined order
    rng = random.Random(0)
    for trial in range(4):
        b, v = ((1, 300), (7, 65536), (32, 2000), (5, 65536))[trial]
        params = [SamplingParams(
            temperature=rng.choice([0, 0.3, 1.0, 1.7]), top_p=rng.choice([1.0, 0.3, 0.9, 0.05]),
            top_k=rng.choice([0, 1, 5, 50, 100, 70000]), presence_penalty=rng.choice([0, 0.5, -0.3]),
            frequency_penalty=rng.choice([0, 0.5, 1.0]), penalty_decay=rng.choice([0.996, 0.5, 0.0, 1.0, 0.01]),
            banned_tokens=rng.choice([(), (0,), (0, 5, 7)]), seed=trial * 100 + i, logprobs=rng.choice([0, 0, 3]))
            for i in range(b)]
        new_states = [SamplerState(p) for p in params]
        old_states = [old.SamplerState(p) for p in params]
        for step in range(40):
            logits = _logits(b, v, seed=1000 * trial + step, scale=rng.choice([0.05, 1.0, 3.0, 10.0]))
            if step % 5 == 0:
                logits = logits.round()  # exact ties
            assert sample_batch(logits, new_states) == old.sample_batch(logits, old_states)
        for a, o in zip(new_states, old_states):
            assert a.counts() == o.counts()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_head_is_value_descending_then_lower_id(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import cpu_kernels
    from worker.sampler import _head

    if native and not cpu_kernels.available():
        pytest.skip(f"native CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    if not native:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    for v in (1, 31, 32, 33, 300, 4099, 65536):
        for seed in range(6):
            x = _logits(5, v, seed=seed, scale=(3.0, 0.5, 10.0)[seed % 3])
            if seed % 2:
                x = x.round()  # ties everywhere, and -0.0 beside 0.0
            if seed >= 4 and v > 3:
                x[:, ::3] = -math.inf
                x[0, 1] = math.nan
                x[1, :] = 1.0
            for k in sorted({1, min(v, 5), min(v, 64), min(v, 1024), v}):
                vals, ids = _head(x, k)
                want_vals, want_ids = _topk_ties_by_id(x, k)
                assert torch.equal(vals.nan_to_num(99.0), want_vals.nan_to_num(99.0)), (v, seed, k)
                if native or k == v:
                    assert torch.equal(ids, want_ids), (v, seed, k)
                else:  # torch.topk picks which of the values tied with the head's last one it keeps
                    inner = vals.nan_to_num(99.0) != vals[:, -1:].nan_to_num(99.0)
                    assert torch.equal(ids[inner], want_ids[inner]), (v, seed, k)


def test_argmax_and_logsumexp_helpers_are_bit_identical() -> None:
    from worker.sampler import _argmax, _logsumexp

    for v in (1, 63, 64, 100, 3000, 65530):
        for seed in range(6):
            x = _logits(9, v, seed=seed)
            if seed % 2:
                x = x.round()
            if seed % 3 == 0:
                x[:, : v // 2] = -math.inf
            assert torch.equal(_argmax(x), x.argmax(dim=1))
            assert torch.equal(_logsumexp(x, torch.empty_like(x)), torch.logsumexp(x, dim=1))


def test_penalties_equal_a_pure_python_reference() -> None:
    # logit[n] -= presence + count[n] * frequency; every count *= decay after each step, then the token counts 1.
    v, steps = 50, 300
    cases = [(0.5, 0.5, 0.996), (0.3, 1.0, 0.5), (-0.2, 0.7, 0.0), (0.0, 2.0, 1.0), (1.0, 0.0, 0.9)]
    params = [SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f, penalty_decay=d, logprobs=5)
              for p, f, d in cases]
    states = [SamplerState(p) for p in params]
    counts: list[dict[int, float]] = [{} for _ in params]
    for step in range(steps):
        logits = _logits(len(params), v, seed=step, scale=0.5)
        results = sample_batch(logits, states)
        for r, (p, res) in enumerate(zip(params, results)):
            row = logits[r].double().tolist()
            for n, c in counts[r].items():
                row[n] -= p.presence_penalty + c * p.frequency_penalty
            z = math.log(sum(math.exp(t) for t in row))
            top = max(range(v), key=lambda n: (row[n], -n))
            assert res.token_id == top or row[res.token_id] == pytest.approx(row[top], abs=1e-5)
            assert res.logprob == pytest.approx(row[res.token_id] - z, abs=1e-4)
            assert dict(res.top_logprobs) == pytest.approx({n: row[n] - z for n, _ in res.top_logprobs}, abs=1e-4)
            # decay 0 forgets the tokens (as the sampler always did), so presence no longer applies to them either
            counts[r] = {n: c * p.penalty_decay for n, c in counts[r].items()} if p.penalty_decay else {}
            counts[r][res.token_id] = counts[r].get(res.token_id, 0.0) + 1.0
            assert states[r].counts() == pytest.approx(counts[r], rel=1e-9, abs=1e-300)


def test_rows_of_collected_states_are_reused_clean() -> None:
    import gc

    from worker.sampler_bank import _bank_for

    bank = _bank_for(torch.device("cpu"))
    states = [SamplerState(SamplingParams(temperature=0, frequency_penalty=1.0)) for _ in range(40)]
    for step in range(3):
        sample_batch(_logits(40, 100, seed=step), states)
    rows_before = bank._rows
    del states
    gc.collect()
    fresh = [SamplerState(SamplingParams(temperature=0)) for _ in range(40)]
    assert all(s.counts() == {} for s in fresh)
    sample_batch(_logits(40, 100, seed=9), fresh)
    assert bank._rows == rows_before  # the collected states' rows were handed out again
    assert all(len(s.counts()) == 1 for s in fresh)


def test_a_state_twice_in_one_batch_is_rejected() -> None:
    state = SamplerState(SamplingParams())
    with pytest.raises(ValueError, match="more than once"):
        sample_batch(torch.zeros(2, 10), [state, state])
