"""The engine's scheduler without torch or a model: admission, slot limits, queue bounds, drops, what runs in a
step and what its samples turn into. A scripted runner stands in for the model."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import count

import pytest

from common.errors import DeadlineExceeded, Overloaded
from rwkv_serve.contract import StopReason
from worker.engine.events import Delta, Finished
from worker.engine.pacing import CostCurve, PrefillPacer
from worker.engine.scheduler import Phase, PrefillGroup, Scheduler, Seq, Step, StepResult


def test_importing_the_scheduler_leaves_torch_out() -> None:
    code = ("import sys; import worker.engine.scheduler, worker.engine.events, worker.engine; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---- fakes: what the scheduler only passes through or calls -------------------------------------------------


@dataclass(frozen=True)
class Params:
    stop_token_ids: tuple[int, ...] = (0,)
    stop_strings: tuple[str, ...] = ()
    logprobs: int = 0


@dataclass(frozen=True)
class Sample:
    token_id: int


@dataclass(frozen=True)
class StopStep:
    text: str
    reason: str | None = None


@dataclass
class Checker:
    """Text "<id>" per token; stops at a stop token or after max_tokens, like worker.sampler.StopChecker."""

    stop_ids: tuple[int, ...] = (0,)
    max_tokens: int = 3
    seen: int = 0

    def step(self, token: int) -> StopStep:
        self.seen += 1
        if token in self.stop_ids:
            return StopStep("", "stop_token")
        return StopStep(f"<{token}>", "max_tokens" if self.seen >= self.max_tokens else None)


@dataclass
class Script:
    """Stands in for a SamplerState: the tokens this turn will sample, in order."""

    tokens: list[int] = field(default_factory=lambda: [7, 8, 9, 10, 11])
    drawn: int = 0

    def draw(self) -> int:
        self.drawn += 1
        return self.tokens[self.drawn - 1]


class LaneState:
    """Stands in for the lane's batched State: select(i) names the row it took."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def select(self, i: int) -> str:
        return f"final-{self.names[i]}"


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{t}>" for t in ids)


def seq(name: str, feed: list[int], *, tokens: list[int] | None = None, max_tokens: int = 3,
        epilogue: tuple[int, ...] = (), prefill_only: bool = False, deadline: float | None = None) -> Seq:
    return Seq(params=Params(), feed=list(feed), epilogue=list(epilogue), state=f"start-{name}", consumed=0,
               sampler=Script(tokens) if tokens is not None else Script(), checker=Checker(max_tokens=max_tokens),
               prefill_only=prefill_only, deadline=deadline, turn=name, prompt_tokens=len(feed))


def scheduler(max_batch: int = 4, max_queued: int = 8, prefill_chunk: int = 4, budget: int = 0) -> Scheduler:
    """Budget 0 (one turn's chunk per step) unless a test is about the grouping."""
    return Scheduler(max_batch=max_batch, max_queued=max_queued, prefill_chunk=prefill_chunk, tokenizer=Tokenizer(),
                     prefill_token_budget=budget)


_forwards = count()


def fake_run(step: Step) -> StepResult:
    """What BatchRunner.run does, with scripted samples: prefilled turns get a new state, sampled rows a token."""
    result = StepResult()
    if step.decode:
        result.lane_state = LaneState([s.turn for s in step.decode])
        result.decode_samples = [Sample(step.decode[i].sampler.draw()) for i in step.sample_rows]
    forward = next(_forwards)
    for group in step.prefill:
        for seq in group.seqs:
            seq.state = f"prefilled-{seq.turn}-{forward}"
        result.prefill_samples.append([Sample(group.seqs[i].sampler.draw()) for i in group.sample_rows])
    return result


def only(plan: Step) -> tuple[Seq, list[int], bool]:
    """The step's one prefill chunk: its turn, its tokens, whether it samples."""
    (group,) = plan.prefill
    (seq,), (tokens,) = group.seqs, group.tokens
    return seq, tokens, group.sample_rows == [0]


def lengths(plan: Step) -> list[tuple[list[str], int]]:
    return [([x.turn for x in g.seqs], g.length) for g in plan.prefill]


def step(s: Scheduler) -> tuple[Step, list[tuple[object, object]]]:
    plan = s.schedule()
    return plan, s.postprocess(plan, fake_run(plan))


def by_turn(events: list[tuple[object, object]], turn: str) -> list[object]:
    return [e for t, e in events if t == turn]


# ---- admission, slots, queue ---------------------------------------------------------------------------------


def test_waiting_turns_are_admitted_in_order_up_to_the_slot_limit() -> None:
    s = scheduler(max_batch=2)
    a, b, c = seq("a", [1]), seq("b", [2]), seq("c", [3])
    for x in (a, b, c):
        s.add(x)
    assert [x.phase for x in (a, b, c)] == [Phase.WAITING] * 3
    plan = s.schedule()
    assert s.running == [a, b] and list(s.waiting) == [c]
    assert (a.phase, b.phase, c.phase) == (Phase.PREFILL, Phase.PREFILL, Phase.WAITING)
    assert only(plan)[0] is a and plan.decode == []  # one prefill per step: the first admitted
    assert (s.load.capacity, s.load.active, s.load.queued) == (2, 2, 1)


def test_a_full_queue_refuses_at_once() -> None:
    s = scheduler(max_batch=1, max_queued=1)
    s.add(seq("a", [1]))
    s.add(seq("b", [2]))  # a free slot counts: one for the slot, one for the queue
    with pytest.raises(Overloaded) as refused:
        s.add(seq("c", [3]))
    assert refused.value.retry_after_s > 0
    s.schedule()  # a takes the slot, b waits
    with pytest.raises(Overloaded):
        s.add(seq("d", [4]))
    assert [x.turn for x in s.waiting] == ["b"] and [x.turn for x in s.running] == ["a"]


def test_a_slot_freed_by_a_finished_turn_admits_the_next_one() -> None:
    s = scheduler(max_batch=1)
    s.add(seq("a", [1], prefill_only=True))
    s.add(seq("b", [2]))
    _, events = step(s)
    (done,) = by_turn(events, "a")
    assert isinstance(done, Finished) and done.state.startswith("prefilled-a") and s.running == []
    plan = s.schedule()
    assert only(plan)[0].turn == "b"


# ---- drops ----------------------------------------------------------------------------------------------------


def test_cancelled_turns_are_dropped_waiting_or_running_and_free_their_slot() -> None:
    s = scheduler(max_batch=1)
    a, b, c = seq("a", [1, 2]), seq("b", [3]), seq("c", [4])
    for x in (a, b, c):
        s.add(x)
    step(s)
    b.cancelled = True  # waiting
    a.cancelled = True  # running
    plan, events = step(s)
    assert [t for t, e in events if isinstance(e, Finished)] == ["b", "a"]  # waiting ones first
    for _, e in events[:2]:
        assert isinstance(e, Finished) and e.reason is StopReason.CANCELLED and e.state is None
    assert by_turn(events, "a")[0].tokens_consumed == 2  # what it had fed, no state handed back
    assert only(plan)[0] is c and s.running == [c] and not s.waiting  # c took the slot in the same step


def test_a_waiting_turn_past_its_deadline_is_dropped_unrun() -> None:
    s = scheduler(max_batch=1)
    running = seq("run", [1], deadline=time.monotonic() + 3600)
    s.add(running)
    step(s)
    running.deadline = time.monotonic() - 1  # deadlines only count while a turn waits
    late = seq("late", [2], deadline=time.monotonic() - 1)
    later = seq("later", [3], deadline=time.monotonic() + 3600)
    s.add(late)
    s.add(later)
    plan, events = step(s)
    (dropped,) = by_turn(events, "late")
    assert isinstance(dropped, DeadlineExceeded) and late.phase is Phase.WAITING
    assert list(s.waiting) == [later] and s.running == [running] and plan.decode == [running]


def test_a_failed_step_fails_the_running_turns_only() -> None:
    s = scheduler(max_batch=1)
    s.add(seq("a", [1]))
    s.add(seq("b", [2]))
    s.schedule()
    ((turn, error),) = s.fail_running(MemoryError("boom"))
    assert turn == "a" and isinstance(error, RuntimeError) and "boom" in str(error)
    assert s.running == [] and [x.turn for x in s.waiting] == ["b"]


def test_cancel_all_drops_everything_at_the_next_step() -> None:
    s = scheduler(max_batch=1)
    for name in "abc":
        s.add(seq(name, [1]))
    step(s)
    s.cancel_all()
    _, events = step(s)
    assert sorted(t for t, _ in events) == ["a", "b", "c"] and s.idle


# ---- what runs in a step, and what comes of it -------------------------------------------------------------------


def test_prefill_goes_in_chunks_then_the_turn_joins_the_decode_lane() -> None:
    s = scheduler(prefill_chunk=4)
    a = seq("a", list(range(1, 11)), tokens=[7, 8, 9])
    s.add(a)
    plan, events = step(s)
    assert only(plan)[1:] == ([1, 2, 3, 4], False) and events == []
    plan, _ = step(s)
    assert only(plan)[1] == [5, 6, 7, 8] and a.consumed == 8 and a.phase is Phase.PREFILL
    plan, events = step(s)  # the last chunk samples the first token
    assert only(plan)[1:] == ([9, 10], True)
    assert events == [("a", Delta("<7>", (7,)))] and a.phase is Phase.DECODE and a.feed == [7]
    b = seq("b", [20, 21])
    s.add(b)
    plan = s.schedule()  # a decodes its token while the newcomer prefills, in the same step
    assert plan.decode == [a] and plan.decode_tokens == [7] and plan.sample_rows == [0]
    assert only(plan)[:2] == (b, [20, 21])


def test_budget_0_is_one_prefill_per_step_and_decode_rows_in_admission_order() -> None:
    s = scheduler(prefill_chunk=8)
    a, b, c = seq("a", [1]), seq("b", [2]), seq("c", [3])
    for x in (a, b, c):
        s.add(x)
    plans = [step(s)[0] for _ in range(3)]
    assert [only(p)[0].turn for p in plans] == ["a", "b", "c"]
    assert [p.decode for p in plans] == [[], [a], [a, b]]
    assert s.schedule().decode == [a, b, c]


def test_a_stop_token_is_not_fed_and_the_epilogue_closes_the_turn() -> None:
    s = scheduler()
    a = seq("a", [1, 2], tokens=[7, 0], max_tokens=10, epilogue=(5, 6))
    s.add(a)
    step(s)  # prefill, samples 7
    _, events = step(s)  # feeds 7, samples the stop token 0
    assert by_turn(events, "a") == [] and a.phase is Phase.CLOSING and a.feed == [5, 6]
    plan, events = step(s)  # feeds the epilogue, one token a step, no sampling
    assert plan.decode_tokens == [5] and plan.sample_rows == [] and events == []
    plan, events = step(s)
    (done,) = by_turn(events, "a")
    assert plan.decode_tokens == [6] and isinstance(done, Finished)
    assert (done.reason, done.stop_token_id, done.state) == (StopReason.STOP_TOKEN, 0, "final-a")
    assert (done.prompt_tokens, done.generated_tokens, done.tokens_consumed) == (4, 2, 5)  # 1 2 7 5 6
    assert s.idle


def test_max_tokens_feeds_the_last_token_and_finishes_with_the_lane_row() -> None:
    s = scheduler()
    a, b = seq("a", [1], tokens=[7, 8], max_tokens=2), seq("b", [2], tokens=[9, 10, 11, 12], max_tokens=4)
    s.add(a)
    s.add(b)
    step(s)  # a prefills
    step(s)  # a decodes (samples 8: its last), b prefills
    assert a.phase is Phase.CLOSING and a.feed == [8]
    plan, events = step(s)  # a feeds 8 beside b's decode row and finishes with its row of the lane's state
    assert plan.decode == [a, b] and plan.sample_rows == [1]
    (done,) = [e for t, e in events if t == "a"]
    assert done.reason is StopReason.MAX_TOKENS and done.state == "final-a" and done.tokens_consumed == 3
    assert s.running == [b]
    assert [e.token_ids for e in by_turn(events, "b")] == [(10,)]


def test_prefill_only_finishes_with_the_prefilled_state_and_no_deltas() -> None:
    s = scheduler(prefill_chunk=2)
    a = seq("a", [1, 2, 3], prefill_only=True)
    s.add(a)
    assert step(s)[1] == []
    plan, events = step(s)
    ((turn, done),) = events
    assert turn == "a" and not only(plan)[2] and isinstance(done, Finished)
    assert done.state == a.state and done.state.startswith("prefilled-a") and done.tokens_consumed == 3
    assert done.generated_tokens == 0 and a.sampler.drawn == 0


# ---- prefill groups and the token budget ---------------------------------------------------------------------------


def test_without_a_decode_lane_every_prefill_chunk_runs_grouped_by_length() -> None:
    s = scheduler(max_batch=8, prefill_chunk=8, budget=4)  # the budget binds only beside a decode lane
    for name, n in (("a", 1), ("b", 7), ("c", 8), ("d", 9), ("e", 1), ("f", 20), ("g", 8)):
        s.add(seq(name, list(range(1, n + 1))))
    plan = s.schedule()
    assert plan.decode == [] and plan.prefill_tokens == 1 + 7 + 8 + 8 + 1 + 8 + 8
    # Groups in order of their first turn, rows in admission order; long prompts still go in chunks of 8.
    assert lengths(plan) == [(["a", "e"], 1), (["b"], 7), (["c", "d", "f", "g"], 8)]
    assert [g.sample_rows for g in plan.prefill] == [[0, 1], [0], [0, 3]]  # d and f have more to feed
    assert all(len(t) == g.length for g in plan.prefill for t in g.tokens)
    events = s.postprocess(plan, fake_run(plan))
    assert sorted(t for t, e in events if isinstance(e, Delta)) == ["a", "b", "c", "e", "g"]
    assert {x.turn: x.consumed for x in s.running} == {"a": 1, "b": 7, "c": 8, "d": 8, "e": 1, "f": 8, "g": 8}
    plan = s.schedule()  # the five that sampled decode; d's tail and f's next chunk prefill (budget 4 now)
    assert [x.turn for x in plan.decode] == ["a", "b", "c", "e", "g"]
    assert lengths(plan) == [(["d"], 1)]  # d's 1 fits, f's 8 do not: f waits for the next step


def test_beside_a_decode_lane_the_budget_bounds_the_step_in_admission_order() -> None:
    s = scheduler(max_batch=8, prefill_chunk=8, budget=20)
    s.add(seq("lane", [1]))
    step(s)  # "lane" decodes from now on
    for name, n in (("a", 8), ("b", 3), ("c", 8), ("d", 8), ("e", 1)):
        s.add(seq(name, list(range(1, n + 1))))
    plan = s.schedule()
    assert [x.turn for x in plan.decode] == ["lane"]
    # 8 + 3 + 8 = 19 fit; d's 8 would exceed 20, so d waits and so does e behind it (no overtaking).
    assert lengths(plan) == [(["a", "c"], 8), (["b"], 3)] and plan.prefill_tokens == 19
    s.postprocess(plan, fake_run(plan))
    plan = s.schedule()
    assert lengths(plan) == [(["d"], 8), (["e"], 1)]


def test_a_budget_below_one_chunk_cuts_the_first_turns_chunk() -> None:
    s = scheduler(prefill_chunk=8, budget=3)
    s.add(seq("a", [1], tokens=list(range(1, 20)), max_tokens=20))  # decodes throughout
    step(s)
    b = seq("b", list(range(10, 20)))
    s.add(b)
    fed = []
    while b.phase is not Phase.DECODE:
        plan, _ = step(s)
        fed.append(plan.prefill[0].tokens[0])
    assert fed == [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19]]  # progress every step, all 10 tokens, in order
    assert b.consumed == 10


def test_prefill_only_and_generating_turns_share_a_group() -> None:
    s = scheduler(prefill_chunk=4, budget=64)
    p, g = seq("p", [1, 2], prefill_only=True), seq("g", [3, 4], tokens=[9])
    s.add(p)
    s.add(g)
    plan = s.schedule()
    (group,) = plan.prefill
    assert isinstance(group, PrefillGroup) and group.seqs == [p, g] and group.sample_rows == [1]
    events = s.postprocess(plan, fake_run(plan))
    assert [(t, type(e).__name__) for t, e in events] == [("p", "Finished"), ("g", "Delta")]
    assert s.running == [g] and g.phase is Phase.DECODE and p.sampler.drawn == 0


# ---- the prefill pacer: synthetic step costs (seconds), no clocks ---------------------------------------------------


def ms(x: float | None) -> float:
    assert x is not None
    return round(x * 1e3, 9)


def test_cost_curve_interpolates_between_points_and_scales_outside_them() -> None:
    c = CostCurve(alpha=0.5)
    assert c.predict(4) is None
    c.observe(4, 0.012)
    c.observe(16, 0.018)
    assert ms(c.predict(10)) == 15.0 and ms(c.predict(2)) == 6.0 and ms(c.predict(32)) == 36.0  # inside, below, above
    assert ms(c.predict(16)) == 18.0
    c.observe(24, 0.022)  # same power-of-two bucket as 16: one running mean of size and time, now (20, 20 ms)
    assert sorted(c.points) == [3, 5] and ms(c.predict(20)) == 20.0 and ms(c.predict(16)) == 18.0
    c.observe(64, 0.010)  # a point above that came out cheaper (noise): flat from the one below, never lower
    assert ms(c.predict(40)) == 20.0 and ms(c.predict(128)) == 20.0


def synthetic_run(step: Step) -> StepResult:
    """fake_run, with each part's seconds: decode 10 ms + 1 ms per lane row, a prefill group 20 ms + 0.1 ms/token
    (a forward whose cost is mostly per call, as on a GPU)."""
    result = fake_run(step)
    result.decode_s = 0.010 + 0.001 * len(step.decode) if step.decode else 0.0
    result.prefill_s = [0.020 + 0.0001 * len(g.seqs) * g.length for g in step.prefill]
    return result


def dear_run(step: Step) -> StepResult:
    """synthetic_run with prefill at 1 ms per token (20 ms + 1 ms/token a group): a CPU, where tokens cost."""
    result = synthetic_run(step)
    result.prefill_s = [0.020 + 0.001 * len(g.seqs) * g.length for g in step.prefill]
    return result


def paced(max_batch: int = 32, slack: float = 0.1) -> Scheduler:
    return Scheduler(max_batch=max_batch, max_queued=64, prefill_chunk=4, tokenizer=Tokenizer(),
                     prefill_token_budget=10_000, pacer=PrefillPacer(slack))


def test_the_pacer_allows_slack_of_the_lane_and_first_chunk() -> None:
    p = PrefillPacer(0.1)
    assert p.allowance(16, 4) == 0.0 and p.added_cost(0, 4) is None  # nothing seen yet: the first chunk alone
    p.observe(16, 0.026, [(4, 0.012), (16, 0.018)])
    p.observe(1, 0.011, [])
    assert ms(p.allowance(16, 4)) == 3.8 and ms(p.allowance(1, 4)) == 2.3  # 0.1 x (26 + 12), 0.1 x (11 + 12)
    # join a group: the slope of the line through (4, 12 ms) and (16, 18 ms), 0.5 ms per token; a new forward: all
    assert ms(p.added_cost(4, 4)) == 2.0 and ms(p.added_cost(0, 4)) == 12.0
    p.observe(1, 0.011, [(32, 0.040)])  # a point off the line (contention): the least-squares slope, not its chord
    # least squares through (4, 12), (16, 18), (32, 40): 1.02 ms per token, between the two chords (0.5, 1.375)
    assert ms(p.added_cost(16, 4)) == ms(4 * p.prefill.slope()) and round(p.prefill.slope() * 1e3, 2) == 1.02


def lane_of(s: Scheduler, n: int, run=synthetic_run) -> None:
    for i in range(n):
        s.add(seq(f"lane{i}", [1], tokens=list(range(1, 30)), max_tokens=20))
    plan = s.schedule()
    assert lengths(plan) == [([f"lane{i}" for i in range(n)], 1)]  # no lane yet: every chunk, one group
    s.postprocess(plan, run(plan))


def test_beside_a_lane_chunks_join_the_first_while_their_cost_fits_the_slack() -> None:
    s = paced()
    lane_of(s, 16, dear_run)
    for i in range(10):
        s.add(seq(f"w{i}", [5, 6, 7, 8]))
    plan = s.schedule()  # a lane of 16 never seen: its cost unknown, so the first chunk runs alone
    assert len(plan.decode) == 16 and lengths(plan) == [(["w0"], 4)]
    s.postprocess(plan, dear_run(plan))
    # Seen: decode 16 rows 26 ms; prefill 16 tokens 36 ms (the lane's prompts), 4 tokens 24 ms: 1 ms per token. A
    # lane of 17 (w0 decodes now), 9 waiting: one chunk per step, the old way, would grow the lane to 25 streams
    # (26 x 25/16 = 40.6 ms), so this step may cost 1.1 x (40.6 + 24) = 71.1 ms, 19.5 ms more than the lane's
    # 27.6 ms and w1's chunk. Each chunk joining w1's group adds 4 ms (the slope): w2-w5 fit (16 ms), w6 would
    # make it 20: it waits, and the turns behind it.
    plan = s.schedule()
    assert len(plan.decode) == 17 and lengths(plan) == [([f"w{i}" for i in range(1, 6)], 4)]
    s.postprocess(plan, dear_run(plan))
    plan = s.schedule()  # a lane of 22, four waiting: less growth ahead, a smaller allowance
    assert len(plan.decode) == 22 and lengths(plan) == [(["w6", "w7", "w8"], 4)]
    s.postprocess(plan, dear_run(plan))
    plan = s.schedule()
    assert lengths(plan) == [(["w9"], 4)]


def test_the_allowance_is_the_slack_or_the_old_step_of_the_grown_lane() -> None:
    """Without turns behind the first, slack x (lane + first chunk); with W waiting, up to (1 + slack) x the step the
    old behaviour would reach, decode(lane + W - 1) + a chunk, when that is more."""
    p = PrefillPacer(0.1)
    p.observe(16, 0.026, [(4, 0.012)])
    p.observe(32, 0.042, [])
    assert ms(p.allowance(16, 4, 1)) == 3.8  # 0.1 x (26 + 12)
    assert ms(p.allowance(16, 4, 2)) == 4.9  # decode(17) = 26 + 16/16 = 27: 1.1 x (27 + 12) - 38
    assert ms(p.allowance(16, 4, 17)) == 21.4  # the lane would reach 32: 1.1 x (42 + 12) - 38
    assert ms(p.allowance(32, 4, 1)) == 5.4  # a full lane: the slack alone, 0.1 x (42 + 12)
    for lane, waiting in ((1, 2), (8, 3), (16, 8), (31, 1)):  # never below the slack rule
        assert p.allowance(lane, 4, waiting) >= p.allowance(lane, 4, 1) > 0


def test_a_prefill_makes_progress_every_step_and_a_burst_beside_a_few_streams_runs_at_once() -> None:
    s = paced(slack=0.25)
    lane_of(s, 2)
    s.pacer = PrefillPacer(0.25)
    s.pacer.observe(1, 0.001, [(4, 1.0)])  # prefill far dearer than the lane
    a, b = seq("a", list(range(1, 11))), seq("b", [1, 2])
    s.add(a)
    s.add(b)
    fed = []
    while b.phase is Phase.PREFILL or b.phase is Phase.WAITING:
        plan, _ = step(s)
        fed.append(lengths(plan))
    # Two streams, two waiting: the first waiting chunk every step, alone (b's would add 0.5 s), in admission order.
    assert fed == [[(["a"], 4)], [(["a"], 4)], [(["a"], 2)], [(["b"], 2)]]
    for streams, burst in ((2, 8), (3, 8)):  # 2 <= 0.25 x 8: the lane does not bind; 3 streams do
        s = paced(slack=0.25)
        s.pacer.observe(1, 0.001, [(4, 1.0)])
        lane_of(s, streams)
        for i in range(burst):
            s.add(seq(f"w{i}", [5, 6, 7, 8]))
        plan = s.schedule()
        assert len(plan.decode) == streams
        assert lengths(plan) == ([([f"w{i}" for i in range(burst)], 4)] if streams == 2 else [(["w0"], 4)])


def test_a_burst_spread_over_steps_is_served_from_the_burst_credit_and_the_credit_is_bounded() -> None:
    # Three streams and four waiting turns: 3 > 0.1 x 4, so without credit the lane binds (one chunk, as above);
    # a credit of 8 streams lets this step take all four and costs 3 of it.
    def burst(s: Scheduler, names: list[str]) -> Step:
        for name in names:
            s.add(seq(name, [5, 6, 7, 8], tokens=list(range(1, 30)), max_tokens=20))
        return s.schedule()

    for credit in (0, 8):
        s = paced()
        s.pacer = PrefillPacer(0.1, burst_streams=credit)
        s.pacer.observe(1, 0.001, [(4, 1.0)])  # prefill far dearer than the lane: the slack admits no second chunk
        lane_of(s, 3)
        plan = burst(s, ["w0", "w1", "w2", "w3"])
        assert len(plan.decode) == 3
        assert lengths(plan) == ([(["w0", "w1", "w2", "w3"], 4)] if credit else [(["w0"], 4)])
        s.postprocess(plan, synthetic_run(plan))  # a lane of 3 earns 3 x 0.005 back
    assert s.pacer.credit == pytest.approx(8 - 3 + 3 * 0.005)
    # Now a lane of 7 (the four decode too) and four more waiting: 7 streams are more than the credit left (5.015).
    s.pacer.prefill = CostCurve()
    for tokens, seconds in ((4, 1.0), (16, 4.0)):  # prefill still dear (the burst step taught it a cheap point)
        s.pacer.prefill.observe(tokens, seconds)
    plan = burst(s, ["x0", "x1", "x2", "x3"])
    assert len(plan.decode) == 7 and lengths(plan) == [(["x0"], 4)]
    # Tokens earn credit back, never above the cap; a lone waiting turn never spends it.
    for _ in range(2000):
        s.pacer.observe(7, 0.001, [])
    assert s.pacer.credit == 8
    assert not s.pacer.takes_burst(7, 1) and s.pacer.credit == 8
    assert s.pacer.takes_burst(8, 2) and s.pacer.credit == 0
    # A step with no lane (no stream decoding: the busy period whose tokens the credit bounded is over) refills it.
    s.pacer.observe(0, 0.0, [(4, 1.0)])
    assert s.pacer.credit == 8


def test_the_pacer_gathers_a_burst_still_arriving_for_at_most_its_predicted_cost() -> None:
    p = PrefillPacer(0.1, burst_streams=8, gather_s=0.005)
    # (lane rows, fresh turns, their tokens, since the last arrival, mean gap between arrivals, held so far)
    assert p.gathers(0, 4, 16, 0.001, 0.002, 0.0) == 0.0  # no prefill seen yet: nothing to weigh the hold against
    p.observe(0, 0.0, [(16, 0.020)])
    assert ms(p.gathers(0, 4, 16, 0.001, 0.002, 0.0)) == 4.0  # until 5 ms of quiet
    assert ms(p.gathers(0, 4, 16, 0.001, 0.002, 0.018)) == 2.0  # until the hold has cost the prefill's 20 ms
    assert p.gathers(0, 4, 16, 0.001, 0.002, 0.020) == 0.0 and p.gathers(0, 4, 16, 0.005, 0.002, 0.0) == 0.0
    assert p.gathers(0, 4, 16, 0.001, 0.010, 0.0) == 0.0  # a turn every 10 ms is not a burst, whatever the last did
    assert p.gathers(0, 1, 4, 0.0, 0.0, 0.0) == 0.0  # a lone turn is never held
    assert p.gathers(8, 4, 16, 0.001, 0.002, 0.0) > 0  # a lane within the credit: the step after takes the burst
    assert p.gathers(9, 4, 16, 0.001, 0.002, 0.0) == 0.0  # beyond it (and beyond slack x waiting) it would not
    assert p.gathers(9, 90, 360, 0.001, 0.002, 0.0) > 0  # 9 <= 0.1 x 90
    assert PrefillPacer(0.1, 8).gathers(0, 4, 16, 0.001, 0.002, 0.0) == 0.0  # gather_s 0: off


def test_a_burst_still_arriving_is_held_then_prefilled_in_one_step() -> None:
    def fresh(s: Scheduler, names: list[str], ago_s: float = 0.0) -> list[Seq]:
        out = [seq(name, [5, 6, 7, 8], tokens=list(range(1, 30)), max_tokens=20) for name in names]
        for x in out:
            x.submitted_ns = time.time_ns() - int(ago_s * 1e9)
            s.add(x)
        return out

    s = paced()
    s.pacer = PrefillPacer(0.1, burst_streams=8, gather_s=0.005)
    s.pacer.observe(0, 0.0, [(8, 10.0)])  # prefill seen, and dear: a hold is always cheaper
    fresh(s, ["a"])
    plan = s.schedule()  # a lone turn: never held
    assert lengths(plan) == [(["a"], 4)] and s.sleep_s == 0.0
    s.postprocess(plan, fake_run(plan))  # "a" decodes now: a lane of one stream
    fresh(s, ["b", "c"])
    plan = s.schedule()  # two fresh turns, the last just arrived: the lane decodes alone, nobody sleeps
    assert len(plan.decode) == 1 and plan.prefill == [] and s.sleep_s == 0.0
    s.postprocess(plan, fake_run(plan))
    late = fresh(s, ["d"])
    plan = s.schedule()
    assert plan.prefill == []
    late[0].submitted_ns += 20_000_000  # were "d" to come 20 ms after "b" and "c", no burst: 10 ms apart on average
    assert s._gather_hold([x for x in s.running if x.phase is Phase.PREFILL], lane_rows=1) == 0.0
    late[0].submitted_ns -= 20_000_000
    s.postprocess(plan, fake_run(plan))
    for x in s.running:  # 5 ms of quiet since the last arrival: the whole burst, one group beside the lane
        x.submitted_ns -= 10_000_000
    plan = s.schedule()
    assert len(plan.decode) == 1 and lengths(plan) == [(["b", "c", "d"], 4)] and late[0].phase is Phase.PREFILL
    s.postprocess(plan, fake_run(plan))
    # Without a lane the engine is told to sleep (at most the quiet gap); a prefill under way is never held.
    s = Scheduler(max_batch=8, max_queued=8, prefill_chunk=2, tokenizer=Tokenizer(), prefill_token_budget=10_000,
                  pacer=PrefillPacer(0.1, 8, gather_s=0.005))
    s.pacer.observe(0, 0.0, [(8, 10.0)])
    fresh(s, ["x", "y"])
    plan = s.schedule()
    assert plan.empty and 0 < s.sleep_s <= 0.005
    for x in s.running:
        x.submitted_ns -= 10_000_000
    plan = s.schedule()
    assert lengths(plan) == [(["x", "y"], 2)] and s.sleep_s == 0.0
    s.postprocess(plan, fake_run(plan))
    fresh(s, ["z"])  # x and y still have 2 tokens to feed: z joins them at once
    plan = s.schedule()
    assert lengths(plan) == [(["x", "y", "z"], 2)]
    # The hold lasts at most the predicted cost of the prefill it waits for, counted from when it began.
    s = Scheduler(max_batch=8, max_queued=8, prefill_chunk=4, tokenizer=Tokenizer(), prefill_token_budget=10_000,
                  pacer=PrefillPacer(0.1, 8, gather_s=0.005))
    s.pacer.observe(0, 0.0, [(8, 0.002)])  # 8 tokens in 2 ms: holding two 4-token turns may cost 2 ms
    fresh(s, ["p", "q"])
    assert s.schedule().empty and 0 < s.sleep_s <= 0.002
    time.sleep(0.004)
    fresh(s, ["r"])  # still arriving, but the hold has cost more than the 3 ms the prefill of all three would
    plan = s.schedule()
    assert lengths(plan) == [(["p", "q", "r"], 4)]
