"""The engine's scheduler: which turns hold the batch's slots, and what each step runs. Plain Python, no torch.

A turn's life (Phase): WAITING (queued) -> PREFILL (its input fed, one chunk per step) -> DECODE (the last
sampled token fed, the next one sampled) -> CLOSING (the reply's last token and the template's epilogue fed, no
sampling) -> finished. One step: schedule() drops cancelled turns (and waiting ones whose deadline passed),
admits waiting turns into free slots and says what runs: every DECODE/CLOSING turn feeds one token, all together
(the decode lane), and the PREFILL turns feed one chunk each (at most `prefill_chunk` tokens), in admission
order, grouped by chunk length so that each group is one batched forward (B x T). While a decode lane runs, a step's
prefill tokens stay within `prefill_token_budget` (a long prompt never stalls the others) and, with a PrefillPacer
(pacing.py), the chunks after the first join only while their measured cost stays within its slack of the lane plus
the first chunk; a step without a decode lane has nobody waiting on a token and takes every PREFILL turn's chunk,
and so does one (with a pacer) whose lane is small against the turns waiting (pacing.py: bursts). Budget 0 is the old
behaviour: one turn's chunk per step. The batch runner runs that Step (and times its parts, which postprocess()
hands to the pacer); postprocess() turns its samples into deltas, decides stops and retires the turns that finished.
States, samplers, stop checkers and the tokenizer pass through here as opaque objects.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from common.errors import DeadlineExceeded, InvalidArgument, Overloaded
from rwkv_serve.contract import StopReason
from worker.engine.events import Delta, EngineEvent, EngineLoad, Finished, TurnTimings
from worker.engine.pacing import PrefillPacer

if TYPE_CHECKING:
    from worker.constraints import TurnConstraint
    from worker.sampler import SampleResult, SamplerState, SamplingParams, StopChecker
    from worker.state import State

# What a step hands out: (the turn's handle, its next event or the error that ended it).
Event = tuple[Any, EngineEvent | Exception]

# Prefill tokens per step beside a running decode lane, the hard cap under the pacer's cost bound (pacing.py).
# Chosen by bench/bench_prefill.py before the pacer (64/128/256 swept, see docs/benchmarks.md): half the old
# one-chunk step's worst case (a full default chunk of 256).
DEFAULT_PREFILL_TOKEN_BUDGET = 128


class Phase(Enum):
    """Where a turn is in its life inside the engine."""

    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    CLOSING = "closing"


@dataclass(eq=False)
class Seq:
    """One turn's working data inside the engine, shared (and mutated) by the scheduler and the batch runner."""

    params: SamplingParams
    feed: list[int]  # tokens still to feed (input remainder, last sampled token, or closing tokens)
    epilogue: list[int]
    state: State | None  # batch size 1; authoritative while the turn is outside the decode lane (None: not yet run)
    consumed: int  # tokens `state` has consumed
    sampler: SamplerState
    checker: StopChecker  # detokenizes (UTF-8 safe), holds back possible stop strings, decides stops
    prefill_only: bool = False
    constraint: TurnConstraint | None = None  # the response_format's matcher; the turn ends when it is complete
    deadline: float | None = None  # time.monotonic(); still WAITING then: dropped unrun
    turn: Any = None  # the caller's handle: events are addressed to it
    cancelled: bool = False  # set by the caller's thread, read at step boundaries
    phase: Phase = Phase.WAITING
    prompt_tokens: int = 0
    generated: list[int] = field(default_factory=list)  # sampled ids, a stop token included
    result: Finished | None = None  # set when CLOSING: what to report once the closing tokens are fed
    submitted_ns: int = 0  # phase times, see TurnTimings
    admitted_ns: int = 0
    prefilled_ns: int = 0

    def timings(self) -> TurnTimings:
        return TurnTimings(self.submitted_ns, self.admitted_ns, self.prefilled_ns, time.time_ns())


@dataclass(eq=False)
class PrefillGroup:
    """Prefill chunks of equal length from several turns: one batched forward (B x T). Equal lengths keep it
    exact: RWKV is recurrent, so a padding token would be consumed into the state."""

    seqs: list[Seq]  # in admission order
    tokens: list[list[int]]  # row i: the chunk seqs[i] feeds; all of one length
    sample_rows: list[int] = field(default_factory=list)  # rows whose chunk ends the input of a turn that generates

    @property
    def length(self) -> int:
        return len(self.tokens[0])


@dataclass(eq=False)
class Step:
    """What runs this step: one token for each turn of the decode lane, and the prefill groups."""

    decode: list[Seq]  # the lane, in admission order: one batched forward (B x 1)
    decode_tokens: list[int]  # the token each of them feeds
    sample_rows: list[int]  # the lane rows that sample (DECODE; CLOSING turns only feed)
    prefill: list[PrefillGroup] = field(default_factory=list)  # one forward each, in order
    events: list[Event] = field(default_factory=list)  # of the turns dropped before the step, in order
    # The response_format matchers of the turns that sample this step (lane first, then the prefill groups): their
    # masks are filled while the forwards run. Empty (and not even looked for) when no running turn has one.
    constraints: list[TurnConstraint] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def prefill_tokens(self) -> int:
        return sum(len(g.seqs) * g.length for g in self.prefill)


@dataclass
class StepResult:
    """What the batch runner hands back for a Step."""

    decode_samples: list[SampleResult] = field(default_factory=list)  # one per Step.sample_rows, in order
    prefill_samples: list[list[SampleResult]] = field(default_factory=list)  # per group, one per its sample_rows
    lane_state: State | None = None  # the lane's new batched state; row i belongs to Step.decode[i]
    decode_s: float = 0.0  # seconds the lane's forward and sampling took
    prefill_s: list[float] = field(default_factory=list)  # per group: seconds its forward and sampling took


class Scheduler:
    """The slots and the queue of one engine: admission, bounds, drops, and what each step runs and yields."""

    def __init__(self, *, max_batch: int, max_queued: int, prefill_chunk: int, tokenizer: Any,
                 prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET, pacer: PrefillPacer | None = None) -> None:
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.prefill_token_budget = prefill_token_budget  # beside a decode lane; 0 = one turn's chunk per step
        self.pacer = pacer  # beside a decode lane, a cost bound too (None: the token budget alone)
        self.tokenizer = tokenizer  # only .decode(): to name the stop string that ended a turn
        self.waiting: deque[Seq] = deque()  # appended by add() on any thread, popped by the engine thread
        self.running: list[Seq] = []  # admitted turns, in admission order; only the engine thread touches it
        self.constrained = 0  # how many of them have a response_format: 0 = no step looks for masks
        self._lock = threading.Lock()  # guards `waiting` between add() and the engine thread
        self._held_since: float | None = None  # when the burst now being gathered was first held back (time.time())
        self.sleep_s = 0.0  # after the last schedule(): how long the engine may sleep (a burst gathered, no lane)

    # ---- the queue ------------------------------------------------------------------------------------------

    def add(self, seq: Seq) -> None:
        """Queues a turn; it is admitted at the next step with a free slot. Overloaded past max_queued."""
        with self._lock:
            # Turns that will find a free slot at the next step do not count against the queue bound.
            if len(self.waiting) >= self.max_queued + max(0, self.free_slots):
                raise Overloaded(f"engine queue is full ({self.max_queued} turns waiting)", retry_after_s=1.0)
            self.waiting.append(seq)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    @property
    def load(self) -> EngineLoad:
        return EngineLoad(self.max_batch, len(self.running), len(self.waiting), self.max_queued)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def cancel_all(self) -> None:
        """Marks every waiting and running turn cancelled: the next step drops them all."""
        with self._lock:
            waiting = list(self.waiting)
        for seq in (*waiting, *self.running):
            seq.cancelled = True

    def fail_running(self, exc: Exception) -> list[Event]:
        """Drops every admitted turn with an error (after a step raised); waiting turns go on."""
        failed, self.running = self.running, []
        self.constrained = 0
        error = RuntimeError(f"engine step failed: {exc!r}")
        return [(seq.turn, error) for seq in failed]

    # ---- before the step: drop, admit, plan -------------------------------------------------------------------

    def schedule(self) -> Step:
        """Drops, admits and says what runs; the tokens to feed this step are taken off each turn's `feed`."""
        events = self._drop()
        self._admit()
        lane = [s for s in self.running if s.phase in (Phase.DECODE, Phase.CLOSING)]
        rows = [i for i, s in enumerate(lane) if s.phase is Phase.DECODE]
        step = Step(lane, [s.feed.pop(0) for s in lane], rows, events=events)
        turns = [s for s in self.running if s.phase is Phase.PREFILL]
        hold = self._gather_hold(turns, lane_rows=len(lane))
        step.prefill = [] if hold else self._plan_prefill(turns, lane_rows=len(lane))
        self.sleep_s = 0.0 if lane else hold
        if self.constrained:
            sampling = [lane[i] for i in rows] + [g.seqs[i] for g in step.prefill for i in g.sample_rows]
            step.constraints = [s.constraint for s in sampling if s.constraint is not None]
        return step

    def _gather_hold(self, turns: list[Seq], lane_rows: int) -> float:
        """Seconds a burst still arriving (the PREFILL `turns`) is held back before its prefill (0: plan it now;
        pacing.py: gathering a burst). Only fresh turns are held (none of their input fed): a prefill under way is
        never delayed."""
        if self.pacer is None or self.pacer.gather_s <= 0 or self.prefill_token_budget <= 0:
            return 0.0
        if len(turns) < 2 or any(len(s.feed) < s.prompt_tokens for s in turns):
            self._held_since = None
            return 0.0
        now = time.time()
        if self._held_since is None:
            self._held_since = now
        tokens = sum(min(len(s.feed), self.prefill_chunk) for s in turns)
        arrivals = [s.submitted_ns / 1e9 for s in turns]
        gap = (max(arrivals) - min(arrivals)) / (len(turns) - 1)
        hold = self.pacer.gathers(lane_rows, len(turns), tokens, now - max(arrivals), gap, now - self._held_since)
        if not hold:
            self._held_since = None
        return hold

    def _plan_prefill(self, turns: list[Seq], lane_rows: int) -> list[PrefillGroup]:
        """The PREFILL turns' chunks this step, in admission order, grouped by length (groups in order of their first
        turn). Beside a decode lane they stay within the token budget and the pacer's cost allowance (with a pacer,
        a lane small against the waiting turns binds nothing: PrefillPacer.takes_burst): the first turn always runs (its
        chunk cut to the token budget if that is smaller); the first turn whose chunk does not fit in what is left
        waits, and so do the ones after it (no overtaking, no chunks cut to odd lengths)."""
        if not turns:
            return []
        if self.prefill_token_budget <= 0:
            turns = turns[:1]
        # With a pacer, a lane small against the turns waiting for a chunk (a burst that arrived while a few streams
        # ran) does not bind: serving the burst now costs those few one longer token (pacing.py: takes_burst).
        binds = self.pacer is None or not (lane_rows and self.pacer.takes_burst(lane_rows, len(turns)))
        left = self.prefill_token_budget if lane_rows and binds and self.prefill_token_budget > 0 else None
        pacer = self.pacer if lane_rows and binds else None
        cost_left = 0.0
        groups: dict[int, PrefillGroup] = {}
        for i, seq in enumerate(turns):
            n = min(len(seq.feed), self.prefill_chunk)
            if left is not None:
                if i == 0:
                    n = min(n, left)
                elif n > left:
                    break
            if pacer is not None:
                if i == 0:
                    cost_left = pacer.allowance(lane_rows, n, len(turns))
                else:
                    group = groups.get(n)
                    added = pacer.added_cost(len(group.seqs) * n if group else 0, n)
                    if added is None or added > cost_left:
                        break
                    cost_left -= added
            if left is not None:
                left -= n
            chunk, seq.feed = seq.feed[:n], seq.feed[n:]
            group = groups.setdefault(n, PrefillGroup([], []))
            if not seq.feed and not seq.prefill_only:
                group.sample_rows.append(len(group.seqs))
            group.seqs.append(seq)
            group.tokens.append(chunk)
        return list(groups.values())

    def _drop(self) -> list[Event]:
        """Drops cancelled turns, and waiting turns whose deadline passed (those never run)."""
        now = time.monotonic()
        with self._lock:
            cancelled = [s for s in self.waiting if s.cancelled]
            expired = [s for s in self.waiting if not s.cancelled and s.deadline is not None and s.deadline <= now]
            for seq in (*cancelled, *expired):
                self.waiting.remove(seq)
        events: list[Event] = [
            (seq.turn, DeadlineExceeded("the turn's deadline passed while it waited for a batch slot"))
            for seq in expired
        ]
        cancelled += [s for s in self.running if s.cancelled]
        if cancelled:
            self.running = [s for s in self.running if not s.cancelled]
            self.constrained = sum(1 for s in self.running if s.constraint is not None)
        for seq in cancelled:
            finished = Finished(StopReason.CANCELLED, seq.prompt_tokens, len(seq.generated), None, seq.consumed,
                                timings=seq.timings())
            events.append((seq.turn, finished))
        return events

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and self.free_slots > 0:
                seq = self.waiting.popleft()
                seq.phase = Phase.PREFILL
                seq.admitted_ns = time.time_ns()
                self.running.append(seq)
                self.constrained += seq.constraint is not None

    # ---- after the step: samples -> events ------------------------------------------------------------------

    def postprocess(self, step: Step, result: StepResult) -> list[Event]:
        """The step's events in order: its drops, the lane's deltas, the lane's finished turns, then the
        prefill groups' (in order, rows in order)."""
        out = step.events
        if self.pacer is not None:
            groups = [(len(g.seqs) * g.length, t) for g, t in zip(step.prefill, result.prefill_s, strict=False)]
            self.pacer.observe(len(step.decode), result.decode_s, groups)
        for seq in step.decode:
            seq.consumed += 1
        for i, sample in zip(step.sample_rows, result.decode_samples, strict=True):
            self._on_sample(step.decode[i], sample, out)
        for i, seq in enumerate(step.decode):
            if seq.phase is Phase.CLOSING and not seq.feed:
                assert result.lane_state is not None
                seq.state = result.lane_state.select(i)
                self._finish(seq, out)
        samples = result.prefill_samples or [[] for _ in step.prefill]
        for group, group_samples in zip(step.prefill, samples, strict=True):
            sampled = dict(zip(group.sample_rows, group_samples, strict=True))
            for i, seq in enumerate(group.seqs):
                self._after_chunk(seq, group.length, sampled.get(i), out)
        return out

    def _after_chunk(self, seq: Seq, fed: int, sample: SampleResult | None, out: list[Event]) -> None:
        """A turn fed one prefill chunk: more to come, or its input is in (finish, or its first token)."""
        seq.consumed += fed
        if seq.feed:  # more chunks to come
            return
        seq.prefilled_ns = time.time_ns()
        if seq.prefill_only:
            seq.result = Finished(StopReason.MAX_TOKENS, 0, 0, None, 0)
            self._finish(seq, out)
            return
        seq.phase = Phase.DECODE
        assert sample is not None
        self._on_sample(seq, sample, out)
        if seq.phase is Phase.CLOSING and not seq.feed:
            self._finish(seq, out)

    def _on_sample(self, seq: Seq, sample: SampleResult, out: list[Event]) -> None:
        """Turns one sampled token into output and decides whether the turn goes on."""
        token = sample.token_id
        seq.generated.append(token)
        if seq.constraint is not None:
            self._on_constrained_sample(seq, sample, out)
            return
        step = seq.checker.step(token)
        is_stop_token = token in seq.params.stop_token_ids
        self._emit(seq, sample, step.text, is_stop_token, out)
        if step.reason is None:
            seq.feed = [token]
            return
        self._close(seq, StopReason[step.reason.upper()], token, is_stop_token)

    def _on_constrained_sample(self, seq: Seq, sample: SampleResult, out: list[Event]) -> None:
        """A response_format turn: its grammar decides the end (stop strings and stop token ids do not apply, so the
        template's "\n\n" cannot cut a JSON value); max_tokens still does, and the output may then be incomplete."""
        token = sample.token_id
        constraint = seq.constraint
        assert constraint is not None
        is_eos = token == constraint.eos_id  # allowed only where the grammar may end: the end, never emitted
        try:
            complete = constraint.advance(token)
        except InvalidArgument as exc:  # a token the grammar rejects fails this turn, not the batch
            out.append((seq.turn, exc))
            self._retire(seq)
            return
        text = "" if is_eos else seq.checker.step(token).text
        if complete:  # also on the max_tokens-th token: the output is complete all the same
            text += seq.checker.finish("constraint_complete").text
        self._emit(seq, sample, text, is_eos, out)
        if not complete and seq.checker.reason is None:
            seq.feed = [token]
            return
        reason = StopReason.CONSTRAINT_COMPLETE if complete else StopReason[seq.checker.reason.upper()]
        self._close(seq, reason, token, is_eos)

    @staticmethod
    def _emit(seq: Seq, sample: SampleResult, text: str, is_stop_token: bool, out: list[Event]) -> None:
        if is_stop_token:  # not part of the conversation: neither emitted nor fed
            if text:
                out.append((seq.turn, Delta(text, ())))
        else:
            out.append((seq.turn, Delta(text, (sample.token_id,), (sample,) if seq.params.logprobs > 0 else ())))

    def _close(self, seq: Seq, reason: StopReason, token: int, is_stop_token: bool) -> None:
        """The turn stops sampling: it feeds its last emitted token and the template's epilogue, then finishes."""
        seq.phase = Phase.CLOSING
        # The last emitted token is fed (the user saw it); a stop string is itself the turn's end, otherwise
        # the template's epilogue closes the reply so the next turn continues a well-formed conversation.
        seq.feed = [] if is_stop_token else [token]
        if reason is not StopReason.STOP_STRING and not self._wrote_epilogue(seq, reason):
            seq.feed += seq.epilogue
            seq.prompt_tokens += len(seq.epilogue)
        seq.result = Finished(
            reason, 0, 0, None, 0,
            stop_string=self._matched_stop_string(seq) if reason is StopReason.STOP_STRING else "",
            stop_token_id=token if reason is StopReason.STOP_TOKEN else -1,
        )

    def _wrote_epilogue(self, seq: Seq, reason: StopReason) -> bool:
        """A grammar that ends with the template's turn end (a tool-call grammar's text branch ends at "\n\n")
        wrote the epilogue itself: it is not fed twice."""
        if reason is not StopReason.CONSTRAINT_COMPLETE or not seq.epilogue:
            return False
        ids = [t for t in seq.generated if seq.constraint is None or t != seq.constraint.eos_id]
        return self.tokenizer.decode(ids).endswith(self.tokenizer.decode(seq.epilogue))

    def _matched_stop_string(self, seq: Seq) -> str:
        text = self.tokenizer.decode([t for t in seq.generated if t not in seq.params.stop_token_ids])
        found = [(text.find(s), -len(s), s) for s in seq.params.stop_strings if s in text]
        return min(found)[2] if found else ""

    def _finish(self, seq: Seq, out: list[Event]) -> None:
        assert seq.result is not None and seq.state is not None
        r = seq.result
        finished = Finished(r.reason, seq.prompt_tokens, len(seq.generated), seq.state, seq.consumed,
                            r.stop_string, r.stop_token_id, seq.timings())
        out.append((seq.turn, finished))
        self._retire(seq)

    def _retire(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.constrained -= seq.constraint is not None
