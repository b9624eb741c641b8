"""The continuous-batching engine on a tiny random model: batched == alone, chunking, stops, cancel, overload."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch

from common.errors import InvalidArgument, Overloaded
from worker.engine import Delta, Engine, EngineEvent, Finished, StopReason, Turn, TurnRequest
from worker.sampler import SamplingParams
from worker.state import State
from worker.state_cache import StateCache

GREEDY = SamplingParams(temperature=0.0, stop_token_ids=(), max_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")




def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(1, 65530, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_greedy(model, tokens: list[int], n: int, state: State | None = None) -> tuple[list[int], State]:
    """The reference: prefill in one call, then argmax and feed, one token at a time, batch size 1."""
    logits, state = model.forward(torch.tensor([tokens]), state or model.init_state(1))
    out = []
    for _ in range(n):
        out.append(int(logits[0].argmax()))
        logits, state = model.forward(torch.tensor([[out[-1]]]), state)
    return out, state


def feed(model, state: State, tokens: list[int]) -> State:
    return model.forward(torch.tensor([tokens]), state)[1]


class Collector:
    """Drives an engine step by step (no event loop) and sorts its events by turn."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.events: dict[int, list[EngineEvent]] = {}

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            for turn, event in self.engine.step_sync():
                self.events.setdefault(turn.id, []).append(event)

    def run(self) -> None:
        while not self.engine.idle:
            self.step()

    def tokens(self, turn: Turn) -> list[int]:
        return [t for e in self.events.get(turn.id, []) if isinstance(e, Delta) for t in e.token_ids]

    def text(self, turn: Turn) -> str:
        return "".join(e.text for e in self.events.get(turn.id, []) if isinstance(e, Delta))

    def finished(self, turn: Turn) -> Finished | None:
        last = self.events.get(turn.id, [None])[-1]
        return last if isinstance(last, Finished) else None


def assert_state_close(a: State, b: State) -> None:
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_sessions_joining_at_different_times_equal_running_alone(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=4, prefill_chunk=32)
    run = Collector(engine)
    specs = [(prompt(5, 1), 12), (prompt(40, 2), 10), (prompt(1, 3), 6), (prompt(100, 4), 8)]
    turns = []
    for i, (tokens, n) in enumerate(specs):  # each joins while the earlier ones are mid-generation
        turns.append(engine.submit(TurnRequest(tokens, replace(GREEDY, max_tokens=n))))
        run.step(2 + i)
    run.run()
    for turn, (tokens, n) in zip(turns, specs):
        expected, expected_state = direct_greedy(tiny_model, tokens, n)
        assert run.tokens(turn) == expected
        done = run.finished(turn)
        assert done is not None and done.reason is StopReason.MAX_TOKENS
        assert (done.prompt_tokens, done.generated_tokens, done.tokens_consumed) == (len(tokens), n, len(tokens) + n)
        assert_state_close(done.state, expected_state)  # the last emitted token is part of the state
        assert run.text(turn) == tokenizer.decode(expected)  # UTF-8-safe deltas concatenate to the decode


def test_chunked_prefill_equals_unchunked(tiny_model, tokenizer) -> None:
    tokens = prompt(150, 7)
    results = []
    for chunk in (7, 64, 1000):
        engine = Engine(tiny_model, tokenizer, prefill_chunk=chunk)
        run = Collector(engine)
        turn = engine.submit(TurnRequest(tokens, GREEDY))
        run.run()
        results.append((run.tokens(turn), run.finished(turn).state))
    for toks, state in results[1:]:
        assert toks == results[0][0]
        assert_state_close(state, results[0][1])


def test_long_prefill_does_not_stall_decoding(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, prefill_chunk=16)
    run = Collector(engine)
    short = engine.submit(TurnRequest(prompt(3, 5), GREEDY))
    run.step()
    engine.submit(TurnRequest(prompt(400, 6), GREEDY))
    run.step(4)  # the long prompt needs 25 chunks; meanwhile the short turn decodes one token per step
    assert len(run.tokens(short)) == 5


def test_turn_continues_from_given_state(tiny_model, tokenizer) -> None:
    first, second = prompt(20, 8), prompt(6, 9)
    start = feed(tiny_model, tiny_model.init_state(1), first)
    engine = Engine(tiny_model, tokenizer)
    run = Collector(engine)
    turn = engine.submit(TurnRequest(second, GREEDY, state=start, tokens_consumed=20))
    run.run()
    expected, _ = direct_greedy(tiny_model, second, 8, state=start)
    assert run.tokens(turn) == expected and run.finished(turn).tokens_consumed == 20 + 6 + 8


def test_stop_token_is_not_fed_and_epilogue_is(tiny_model, tokenizer) -> None:
    tokens = prompt(10, 10)
    expected, _ = direct_greedy(tiny_model, tokens, 8)
    k = max(i for i, t in enumerate(expected) if t not in expected[:i])  # the latest step a token first appears
    params = SamplingParams(temperature=0.0, stop_token_ids=(expected[k],), max_tokens=50)
    engine = Engine(tiny_model, tokenizer)
    run = Collector(engine)
    epilogue = [261, 5]
    turn = engine.submit(TurnRequest(tokens, params, epilogue=epilogue))
    run.run()
    done = run.finished(turn)
    assert done.reason is StopReason.STOP_TOKEN and done.stop_token_id == expected[k]
    assert run.tokens(turn) == expected[:k] and done.generated_tokens == k + 1
    state = feed(tiny_model, tiny_model.init_state(1), tokens + expected[:k] + epilogue)
    assert_state_close(done.state, state)
    assert done.prompt_tokens == len(tokens) + len(epilogue)


def test_stop_string_cuts_text_and_feeds_its_token(tiny_model, tokenizer) -> None:
    tokens = prompt(10, 11)
    expected, _ = direct_greedy(tiny_model, tokens, 12)
    full = tokenizer.decode(expected)
    stop = next(s for s in (tokenizer.decode([t]) for t in expected[3:]) if s.strip() and "\ufffd" not in s)
    cut = full.find(stop)
    j = next(j for j in range(len(expected)) if stop in tokenizer.decode(expected[: j + 1]))
    params = SamplingParams(temperature=0.0, stop_token_ids=(), stop_strings=(stop,), max_tokens=50)
    engine = Engine(tiny_model, tokenizer)
    run = Collector(engine)
    turn = engine.submit(TurnRequest(tokens, params, epilogue=[261]))
    run.run()
    done = run.finished(turn)
    assert done.reason is StopReason.STOP_STRING and done.stop_string == stop
    assert run.text(turn) == full[:cut]
    # The token completing the stop string is fed; no epilogue (the stop string is the turn's end).
    assert_state_close(done.state, feed(tiny_model, tiny_model.init_state(1), tokens + expected[: j + 1]))


def test_prefill_only(tiny_model, tokenizer) -> None:
    tokens = prompt(30, 12)
    engine = Engine(tiny_model, tokenizer, prefill_chunk=8)
    run = Collector(engine)
    turn = engine.submit(TurnRequest(tokens, prefill_only=True))
    run.run()
    done = run.finished(turn)
    assert run.events[turn.id] == [done] and done.tokens_consumed == 30
    assert_state_close(done.state, feed(tiny_model, tiny_model.init_state(1), tokens))


def test_cancel_frees_the_slot_within_one_step(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=1, max_queued=4)
    run = Collector(engine)
    long = engine.submit(TurnRequest(prompt(3, 13),
                                     SamplingParams(temperature=0.0, stop_token_ids=(), max_tokens=1000)))
    run.step(3)
    waiting = engine.submit(TurnRequest(prompt(3, 14), GREEDY))
    run.step()
    assert engine.load.active == 1 and engine.load.queued == 1 and not run.events.get(waiting.id)
    long.cancel()
    run.step()
    done = run.finished(long)
    assert done.reason is StopReason.CANCELLED and done.state is None
    assert len(run.tokens(waiting)) == 1  # admitted and prefilled in that same step
    run.run()
    assert run.tokens(waiting) == direct_greedy(tiny_model, prompt(3, 14), 8)[0]


def test_overload_is_refused(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=1, max_queued=1)
    engine.submit(TurnRequest([1], GREEDY))
    engine.submit(TurnRequest([2], GREEDY))
    with pytest.raises(Overloaded) as info:
        engine.submit(TurnRequest([3], GREEDY))
    assert info.value.retry_after_s > 0


def test_bad_requests_are_invalid(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_tokens_limit=100)
    for request in (
        TurnRequest([], GREEDY),
        TurnRequest([70000], GREEDY),
        TurnRequest([1], SamplingParams(temperature=-1)),
        TurnRequest([1], SamplingParams(max_tokens=101)),
    ):
        with pytest.raises(InvalidArgument):
            engine.submit(request)


async def test_async_loop_streams_concurrent_turns(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=4)
    engine.start()
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    async def consume(tokens: list[int]) -> tuple[list[int], Finished]:
        out, last = [], None
        async for event in engine.submit(TurnRequest(tokens, GREEDY)):
            if isinstance(event, Delta):
                out += event.token_ids
            last = event
        return out, last

    beat = asyncio.create_task(heartbeat())
    try:
        results = await asyncio.gather(*(consume(prompt(8, s)) for s in range(3)))
    finally:
        beat.cancel()
        await engine.close()
    for seed, (tokens, done) in enumerate(results):
        assert tokens == direct_greedy(tiny_model, prompt(8, seed), 8)[0] and done.reason is StopReason.MAX_TOKENS
    assert ticks > 3  # the event loop kept running while the model computed in the engine thread


async def test_a_burst_arriving_over_several_ms_is_gathered_into_one_prefill_step(tiny_model, tokenizer) -> None:
    """The engine thread holds a burst back while its turns keep coming (pacing.py: gathering a burst), then
    prefills it in one step; the replies are those of each turn alone."""
    engine = Engine(tiny_model, tokenizer, max_batch=8, prefill_gather_ms=50)  # wide margins on a noisy machine
    engine.scheduler.pacer.prefill.observe(8, 10.0)  # a dear prefill: the hold is bounded by the quiet gap alone
    steps = []
    engine.on_step = steps.append
    engine.start()

    async def consume(tokens: list[int], delay_s: float) -> list[int]:
        await asyncio.sleep(delay_s)
        out = []
        async for event in engine.submit(TurnRequest(tokens, GREEDY)):
            if isinstance(event, Delta):
                out += event.token_ids
        return out

    try:
        # Two together, then one every 5 ms: without the hold the first step would take the first two alone.
        delays = [0.0, 0.0, 0.005, 0.010, 0.015]
        results = await asyncio.gather(*(consume(prompt(8, 40 + i), d) for i, d in enumerate(delays)))
    finally:
        await engine.close()
    first = next(s for s in steps if s.prefill_turns)
    assert first.prefill_turns == 5 and first.lane == 0, steps[:3]
    for i, tokens in enumerate(results):
        assert tokens == direct_greedy(tiny_model, prompt(8, 40 + i), 8)[0]


def test_state_cache_is_lru_by_bytes_and_version_checked(tiny_model) -> None:
    one = tiny_model.init_state(1)
    cache = StateCache(max_bytes=2 * one.nbytes)
    cache.put("a", 1, one, 10)
    cache.put("b", 1, one, 20)
    assert cache.get("a", 1) == (one, 10)  # a is now the most recent
    cache.put("c", 3, one, 30)  # evicts b
    assert cache.get("b", 1) is None and cache.get("c", 3) == (one, 30)
    assert cache.get("a", 2) is None and cache.get("a", 1) is None  # a stale version is dropped
    assert len(cache) == 1


async def test_failed_step_fails_its_turns_and_the_engine_goes_on(tiny_model, tokenizer, monkeypatch) -> None:
    engine = Engine(tiny_model, tokenizer)
    engine.start()
    original = engine.batch_runner.run

    def broken(step):
        raise torch.cuda.OutOfMemoryError("simulated")

    try:
        monkeypatch.setattr(engine.batch_runner, "run", broken)
        doomed = engine.submit(TurnRequest([1, 2], GREEDY))
        with pytest.raises(RuntimeError, match="engine step failed"):
            async for _ in doomed:
                pass
        monkeypatch.setattr(engine.batch_runner, "run", original)
        events = [e async for e in engine.submit(TurnRequest([1, 2], GREEDY))]
        assert isinstance(events[-1], Finished) and events[-1].reason is StopReason.MAX_TOKENS
    finally:
        await engine.close()


def test_ids_the_tokenizer_cannot_decode_are_never_sampled(tiny_checkpoint, tokenizer) -> None:
    # World models have 65536 output rows but 65530 tokens: make a spare row win every argmax.
    from worker.model import RWKV5, read_checkpoint

    params = dict(read_checkpoint(tiny_checkpoint))
    head = params["head.weight"].clone()
    head[65534] = head[65534].sign() * 50  # huge logit for an id with no token
    params["head.weight"] = head
    model = RWKV5(params)
    assert model.forward(torch.tensor([prompt(5, 1)]), model.init_state(1))[0].argmax().item() == 65534
    engine = Engine(model, tokenizer, max_batch=2)
    run = Collector(engine)
    hot = engine.submit(TurnRequest(prompt(5, 1), GREEDY))
    sampled = engine.submit(TurnRequest(prompt(5, 2), replace(GREEDY, temperature=1.0, seed=3, banned_tokens=(65535,))))
    run.run()
    for turn in (hot, sampled):
        assert run.finished(turn) is not None and run.finished(turn).reason is StopReason.MAX_TOKENS
        assert len(run.tokens(turn)) == 8 and max(run.tokens(turn)) < tokenizer.vocab_size


# ---- prefill batched across sessions -------------------------------------------------------------------------------

MIXED = (1, 7, 8, 9, 33, 200)  # around the WKV chunk of 8 and the engine's prefill chunk of 32 below


def test_batched_prefill_equals_prefilling_each_session_alone(tiny_model, tokenizer) -> None:
    prompts = [prompt(n, 100 + n) for n in MIXED]
    results = {}
    # 0: one session's chunk per step, alone; the others group equal lengths ("paced": as the pacer's measured
    # costs decide, so no grouping is asserted, only the results).
    for budget in (0, 64, 10_000, "paced"):
        slack = {"prefill_cost_slack": None} if budget != "paced" else {}
        engine = Engine(tiny_model, tokenizer, max_batch=8, prefill_chunk=32,
                        prefill_token_budget=10_000 if budget == "paced" else budget, **slack)
        run = Collector(engine)
        turns = [engine.submit(TurnRequest(p, GREEDY)) for p in prompts]
        grouped = []
        while not engine.idle:
            plan = engine.scheduler.schedule()
            grouped.append(max((len(g.seqs) for g in plan.prefill), default=0))
            for turn, event in engine.scheduler.postprocess(plan, engine.batch_runner.run(plan)):
                run.events.setdefault(turn.id, []).append(event)
        results[budget] = [(run.tokens(t), run.finished(t)) for t in turns]
        if budget != "paced":
            assert max(grouped) == (1 if budget == 0 else 2)  # 33 and 200 share 32-token chunks
    for p, (tokens, done) in zip(prompts, results[0]):
        expected, expected_state = direct_greedy(tiny_model, p, 8)
        assert tokens == expected
        assert_state_close(done.state, expected_state)
    for budget in (64, 10_000, "paced"):
        for (tokens, done), (alone_tokens, alone) in zip(results[budget], results[0]):
            assert tokens == alone_tokens and done.tokens_consumed == alone.tokens_consumed
            assert_state_close(done.state, alone.state)


def test_batched_prefill_states_match_within_the_fp32_bound(tiny_model, tokenizer) -> None:
    """Prefill-only turns: the states of a batched prefill against the model fed each prompt alone, in one call;
    and the first logits from those states within 1e-4 of their RMS (the bound of tests/test_model.py)."""
    prompts = [prompt(n, 200 + n) for n in MIXED]
    engine = Engine(tiny_model, tokenizer, max_batch=8, prefill_chunk=32, prefill_token_budget=10_000)
    run = Collector(engine)
    turns = [engine.submit(TurnRequest(p, prefill_only=True)) for p in prompts]
    run.run()
    probe = torch.tensor([[261]])
    for p, turn in zip(prompts, turns):
        done = run.finished(turn)
        alone = feed(tiny_model, tiny_model.init_state(1), p)
        assert done.tokens_consumed == len(p)
        assert_state_close(done.state, alone)
        got, want = tiny_model.forward(probe, done.state)[0], tiny_model.forward(probe, alone)[0]
        assert (got - want).abs().max() <= 1e-4 * want.pow(2).mean().sqrt()


def test_the_decode_lane_keeps_stepping_while_a_big_prefill_group_runs(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=8, prefill_chunk=16, prefill_token_budget=32,
                    prefill_cost_slack=None)  # the token budget alone: which chunks group is then deterministic
    run = Collector(engine)
    streaming = engine.submit(TurnRequest(prompt(3, 20), replace(GREEDY, max_tokens=50)))
    run.step()
    assert len(run.tokens(streaming)) == 1
    big = [engine.submit(TurnRequest(prompt(300, 21 + i), GREEDY)) for i in range(6)]
    steps = 0
    while not all(run.tokens(t) for t in big):
        before = len(run.tokens(streaming))
        plan = engine.scheduler.schedule()
        assert plan.prefill_tokens <= 32 and streaming._seq in plan.decode
        for turn, event in engine.scheduler.postprocess(plan, engine.batch_runner.run(plan)):
            run.events.setdefault(turn.id, []).append(event)
        assert len(run.tokens(streaming)) == before + 1  # one token every step, prefill or not
        steps += 1
        if steps == 49:
            break
    assert len(run.tokens(streaming)) == steps + 1 and any(len(g.seqs) == 2 for g in plan.prefill)
    run.run()
    for i, t in enumerate(big):
        assert run.tokens(t) == direct_greedy(tiny_model, prompt(300, 21 + i), 8)[0]


def test_the_engine_paces_prefill_by_default_from_its_timed_steps(tiny_model, tokenizer) -> None:
    with pytest.raises(ValueError, match="prefill_cost_slack"):
        Engine(tiny_model, tokenizer, prefill_cost_slack=-0.1)
    with pytest.raises(ValueError, match="prefill_burst_streams"):
        Engine(tiny_model, tokenizer, prefill_burst_streams=-1)
    assert Engine(tiny_model, tokenizer, prefill_cost_slack=None).scheduler.pacer is None
    assert Engine(tiny_model, tokenizer, max_batch=32).scheduler.pacer.credit == 8  # the burst credit: max_batch // 4
    assert Engine(tiny_model, tokenizer, max_batch=32, prefill_burst_streams=0).scheduler.pacer.burst_streams == 0
    with pytest.raises(ValueError, match="prefill_gather_ms"):
        Engine(tiny_model, tokenizer, prefill_gather_ms=-1)
    assert Engine(tiny_model, tokenizer).scheduler.pacer.gather_s == 0.005  # a burst still arriving is gathered
    assert Engine(tiny_model, tokenizer, prefill_gather_ms=0).scheduler.pacer.gather_s == 0
    engine = Engine(tiny_model, tokenizer, max_batch=4, prefill_chunk=16)
    pacer = engine.scheduler.pacer
    assert pacer is not None and pacer.slack == 0.1
    run = Collector(engine)
    lane = engine.submit(TurnRequest(prompt(3, 30), replace(GREEDY, max_tokens=6)))
    run.step()
    late = engine.submit(TurnRequest(prompt(40, 31), GREEDY))  # 16 + 16 + 8 beside the lane
    run.run()
    # Every part was timed: the lane's decodes by rows, the prefill forwards by tokens (3, 16, 8).
    assert pacer.decode.points and all(t > 0 for _, t in pacer.decode.points.values())
    assert {round(x) for x, _ in pacer.prefill.points.values()} == {3, 16, 8}
    assert run.tokens(late) == direct_greedy(tiny_model, prompt(40, 31), 8)[0]
    assert run.tokens(lane) == direct_greedy(tiny_model, prompt(3, 30), 6)[0]


def test_the_step_trace_records_every_step_and_when_each_prefill_arrived(tiny_model, tokenizer, tmp_path,
                                                                          redis_url) -> None:
    import json

    from worker.server import WorkerCore
    from worker.settings import WorkerSettings

    trace = tmp_path / "steps.jsonl"
    core = WorkerCore(WorkerSettings(redis_url=redis_url, port=0, model_id="tiny", step_trace=trace), tiny_model,
                      tokenizer, "tiny")  # the worker's setting wires Engine.on_step to the file
    run = Collector(core.engine)
    before = time.time()
    a = core.engine.submit(TurnRequest(prompt(5, 40), replace(GREEDY, max_tokens=3)))
    run.step()
    b = core.engine.submit(TurnRequest(prompt(7, 41), replace(GREEDY, max_tokens=2), tokens_consumed=100))
    run.run()
    core._trace.close()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    # a: prefill (+ its first token), 2 decode steps; b's prefill beside a's first decode, then its one decode; both
    # last tokens fed together (CLOSING: the state after the reply).
    steps = [(r["lane"], r["prefill_tokens"], r["prefill_turns"]) for r in records]
    assert steps == [(0, 5, 1), (1, 7, 1), (2, 0, 0), (2, 0, 0)]
    assert [len(r["arrivals"]) for r in records] == [1, 1, 0, 0]  # b's too, though its state had consumed 100
    assert before <= records[0]["arrivals"][0] <= records[0]["started"] <= records[1]["arrivals"][0]
    assert all(r["seconds"] > 0 for r in records)
    assert len(run.tokens(a)) == 3 and len(run.tokens(b)) == 2
