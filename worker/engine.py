"""The continuous-batching engine: turns join the running batch between steps and stream their tokens out.

One step (`Engine.step_sync`, run in the engine's own thread so the asyncio loop stays responsive):
  admit waiting turns into free slots -> one batched decode forward (B x 1) for every decoding turn
  -> at most one prefill chunk (so a long prompt never stalls the others) -> sample -> text deltas
  -> turns that finished hand back their final state (batch size 1) for the caller to commit.

A turn's life: PREFILL (feed its prompt, chunk by chunk) -> DECODE (feed the last sampled token, sample the
next) -> CLOSING (feed the reply's last token and the template's epilogue, no sampling) -> finished.
The final state has consumed the prompt and every emitted token (plus the epilogue), never a stop token, so
the next turn continues exactly the conversation the user saw. A cancelled turn hands back no state.

Knows nothing of gRPC or Redis: callers pass states and token ids in, and get events out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import torch

from common.errors import DeadlineExceeded, InvalidArgument, Overloaded, Unavailable
from worker.model import RWKV5
from worker.sampler import SampleResult, SamplerState, SamplingParams, StopChecker, sample_batch
from worker.state import State
from rwkv_serve.contract import StopReason

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TurnRequest:
    """One turn for the engine: input tokens fed onto a starting state, then generation."""

    tokens: Sequence[int]  # input (at least one token): the formatted user turn or the raw prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    state: State | None = None  # batch size 1; None = the model's initial (zero) state
    tokens_consumed: int = 0  # tokens `state` has consumed before this turn
    epilogue: Sequence[int] = ()  # fed after the reply unless a stop string ended it (the template's turn end)
    prefill_only: bool = False  # feed the input and finish (e.g. to build a system prompt's state)
    deadline: float | None = None  # time.monotonic(); still waiting for a slot then: dropped unrun (DeadlineExceeded)


@dataclass(frozen=True)
class Delta:
    """Output of one generated token: its new text (possibly empty while held back), id and log-probability."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampleResult, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of a turn."""

    reason: StopReason
    prompt_tokens: int  # input + epilogue tokens fed
    generated_tokens: int  # sampled tokens, a stop token included
    state: State | None  # batch size 1, None when cancelled
    tokens_consumed: int  # by `state` in total
    stop_string: str = ""
    stop_token_id: int = -1
    timings: TurnTimings | None = None  # when the turn went through the engine's phases (for tracing)


@dataclass(frozen=True)
class TurnTimings:
    """Wall-clock times (time.time_ns()) of a turn's phases in the engine; 0 = the phase was never reached.

    The engine runs in its own thread, outside any trace context: the caller turns these into queue, prefill
    and decode spans under the turn's span, with these start and end times."""

    submitted_ns: int
    admitted_ns: int  # left the queue for a batch slot
    prefilled_ns: int  # the whole input was fed (and the first token sampled)
    finished_ns: int


TurnEvent = Delta | Finished


class Phase(Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    CLOSING = "closing"


class Turn:
    """Handle of a submitted turn: iterate it for events (ending with Finished); cancel() to stop it."""

    def __init__(self, turn_id: int, engine: Engine) -> None:
        self.id = turn_id
        self._engine = engine
        self._events: asyncio.Queue[TurnEvent | Exception] = asyncio.Queue()
        self.cancelled = False  # read by the engine thread at step boundaries
        self.done = False

    def cancel(self) -> None:
        """Stops the turn at the next step boundary; its batch slot is freed within one step."""
        if not self.done:
            self.cancelled = True
            self._engine._wake()

    async def next_event(self) -> TurnEvent:
        """The next event; raises the engine's exception if the step running this turn failed."""
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def poll(self) -> TurnEvent | None:
        """The next event if one is already delivered (None otherwise); raises like next_event()."""
        if self._events.empty():
            return None
        event = self._events.get_nowait()
        if isinstance(event, BaseException):
            raise event
        return event

    async def __aiter__(self) -> AsyncIterator[TurnEvent]:
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, Finished):
                return


@dataclass(eq=False)
class _Slot:
    """A turn's working data inside the engine."""

    turn: Turn
    params: SamplingParams
    feed: list[int]  # tokens still to feed (prompt remainder, last sampled token, or closing tokens)
    epilogue: list[int]
    state: State | None  # authoritative while the slot is outside the decode lane
    consumed: int
    sampler: SamplerState
    checker: StopChecker  # detokenizes (UTF-8 safe), holds back possible stop strings, decides stops
    prefill_only: bool
    deadline: float | None = None
    phase: Phase = Phase.WAITING
    prompt_tokens: int = 0
    generated: list[int] = field(default_factory=list)  # sampled ids, a stop token included
    result: Finished | None = None  # set when CLOSING: what to report once the closing tokens are fed
    submitted_ns: int = 0  # phase times, see TurnTimings
    admitted_ns: int = 0
    prefilled_ns: int = 0

    def timings(self) -> TurnTimings:
        return TurnTimings(self.submitted_ns, self.admitted_ns, self.prefilled_ns, time.time_ns())


@dataclass(frozen=True)
class EngineLoad:
    """How busy the engine is."""

    capacity: int
    active: int
    queued: int
    max_queued: int


@dataclass
class _Lane:
    """The decode lane: the slots decoded together last step and their batched state (B = len(slots))."""

    slots: list[_Slot] = field(default_factory=list)
    state: State | None = None
    spare: State | None = None  # last step's input buffer: the next step writes its output there (no page faults)


class Engine:
    """Continuous batching over one model. submit() turns; run() (or step_sync() in tests) makes progress."""

    def __init__(
        self,
        model: RWKV5,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queued: int = 64,
        prefill_chunk: int = 256,
        max_tokens_limit: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queued < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be positive, max_queued non-negative")
        self.model = model
        self.tokenizer = tokenizer
        # Sample only ids the tokenizer can decode: World models have 65536 output rows but 65530 tokens, and a
        # random or poorly trained model does pick the 6 spare rows (one such id used to fail the whole batch).
        self.sample_vocab = min(model.config.vocab_size, getattr(tokenizer, "vocab_size", model.config.vocab_size))
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.max_tokens_limit = max_tokens_limit
        self._ids = itertools.count(1)
        self._waiting: deque[_Slot] = deque()  # appended by submit(), popped by the engine thread
        self._slots: list[_Slot] = []  # admitted turns, in admission order; only the engine thread touches it
        self._lane = _Lane()
        self._lock = threading.Lock()  # guards _waiting between submit() and the engine thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-engine")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.on_decode: Callable[[int], None] | None = None  # metrics hook: each decode step's batch (engine thread)

    # ---- submitting -----------------------------------------------------------------------------------------

    def submit(self, request: TurnRequest) -> Turn:
        """Queues a turn; it joins the batch at the next step with a free slot. Overloaded past max_queued."""
        if self._closed:
            raise Unavailable("engine is shutting down")
        params = request.params
        vocab = self.model.config.vocab_size
        try:
            params.validate(vocab, self.max_tokens_limit)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        tokens = [int(t) for t in request.tokens]
        if not tokens:
            raise InvalidArgument("a turn needs at least one input token")
        if any(t < 0 or t >= vocab for t in (*tokens, *request.epilogue)):
            raise InvalidArgument(f"token ids must lie in [0, {vocab})")
        if request.state is not None and request.state.batch_size != 1:
            raise ValueError("a turn's starting state must have batch size 1")
        if request.deadline is not None and request.deadline <= time.monotonic():
            raise DeadlineExceeded("the turn's deadline passed before it was queued")
        turn = Turn(next(self._ids), self)
        slot = _Slot(
            turn=turn,
            params=params,
            feed=tokens,
            epilogue=[int(t) for t in request.epilogue],
            state=request.state,
            consumed=request.tokens_consumed,
            sampler=SamplerState(params),
            checker=StopChecker.from_params(params, self.tokenizer),
            prefill_only=request.prefill_only,
            deadline=request.deadline,
            prompt_tokens=len(tokens),
            submitted_ns=time.time_ns(),
        )
        with self._lock:
            if len(self._waiting) >= self.max_queued + max(0, self._free_slots()):
                raise Overloaded(f"engine queue is full ({self.max_queued} turns waiting)", retry_after_s=1.0)
            self._waiting.append(slot)
        self._wake()
        return turn

    def _free_slots(self) -> int:
        return self.max_batch - len(self._slots)

    @property
    def load(self) -> EngineLoad:
        return EngineLoad(self.max_batch, len(self._slots), len(self._waiting), self.max_queued)

    @property
    def idle(self) -> bool:
        return not self._slots and not self._waiting

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def start(self) -> None:
        """Starts the engine loop as a task on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self.run(), name="rwkv-engine")

    async def run(self) -> None:
        """Sleeps on an event while idle; otherwise the engine thread steps until idle. Events are delivered on
        this loop."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()  # a submit() from now on sets it again, so no wake-up is lost
            await loop.run_in_executor(self._executor, self._step_until_idle, loop)

    def _step_until_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Engine thread: step back to back while there is work, handing each step's events to the event loop.
        The next step starts without waiting for the loop to be scheduled (it was idle ~15% of the time when
        every step went through run_in_executor)."""
        while not self.idle:
            try:
                deliveries = self.step_sync()
            except Exception as exc:  # a bug or e.g. out of device memory: fail this batch, keep serving
                log.exception("engine step failed; failing the %d turns in the batch", len(self._slots))
                deliveries = self._fail_batch(exc)
            try:
                loop.call_soon_threadsafe(self._deliver, deliveries)
            except RuntimeError:  # the event loop is closed: nobody is left to deliver to
                return

    def _fail_batch(self, exc: Exception) -> list[tuple[Turn, TurnEvent | Exception]]:
        """Drops every admitted turn (engine thread, after its step raised); waiting turns go on."""
        failed, self._slots, self._lane = self._slots, [], _Lane()
        error = RuntimeError(f"engine step failed: {exc!r}")
        return [(slot.turn, error) for slot in failed]

    def _deliver(self, deliveries: list[tuple[Turn, TurnEvent | Exception]]) -> None:
        for turn, event in deliveries:
            if isinstance(event, (Finished, Exception)):
                turn.done = True
            turn._events.put_nowait(event)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Waits until no turn is running or waiting; False on timeout."""
        async def wait_idle() -> None:
            while not self.idle:
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(wait_idle(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        """Cancels every turn, stops the loop and the engine thread."""
        self._closed = True
        with self._lock:
            waiting = list(self._waiting)
        for slot in [*waiting, *self._slots]:
            slot.turn.cancel()
        if self._task is not None:
            await self.drain(5.0)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    # ---- one step (engine thread) -----------------------------------------------------------------------------

    def step_sync(self) -> list[tuple[Turn, TurnEvent]]:
        """Runs one engine step; returns the events to deliver, in order. Call from one thread at a time."""
        out: list[tuple[Turn, TurnEvent]] = []
        self._drop_cancelled(out)
        self._admit()
        lane = [s for s in self._slots if s.phase in (Phase.DECODE, Phase.CLOSING)]
        prefill = next((s for s in self._slots if s.phase is Phase.PREFILL), None)
        if lane:
            self._decode(lane, out)
        else:
            self._lane = _Lane()  # let go of the last batch's tensors
        if prefill is not None:
            self._prefill(prefill, out)
        return out

    def _drop_cancelled(self, out: list[tuple[Turn, TurnEvent | Exception]]) -> None:
        """Drops cancelled turns, and waiting turns whose deadline passed (those never run)."""
        now = time.monotonic()
        with self._lock:
            cancelled = [s for s in self._waiting if s.turn.cancelled]
            expired = [s for s in self._waiting
                       if not s.turn.cancelled and s.deadline is not None and s.deadline <= now]
            for slot in (*cancelled, *expired):
                self._waiting.remove(slot)
        for slot in expired:
            out.append((slot.turn, DeadlineExceeded("the turn's deadline passed while it waited for a batch slot")))
        cancelled += [s for s in self._slots if s.turn.cancelled]
        if not cancelled:
            return
        self._slots = [s for s in self._slots if not s.turn.cancelled]
        for slot in cancelled:
            finished = Finished(StopReason.CANCELLED, slot.prompt_tokens, len(slot.generated), None, slot.consumed,
                                timings=slot.timings())
            out.append((slot.turn, finished))

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._free_slots() > 0:
                slot = self._waiting.popleft()
                slot.phase = Phase.PREFILL
                slot.admitted_ns = time.time_ns()
                if slot.state is None:
                    slot.state = self.model.init_state(1)
                self._slots.append(slot)

    def _lane_state(self, lane: list[_Slot]) -> State:
        """The batched state of `lane`, reusing last step's batch when the lane did not change."""
        previous = self._lane
        if previous.slots == lane and previous.state is not None:
            return previous.state
        index = {id(s): i for i, s in enumerate(previous.slots)}
        parts = []
        for slot in lane:
            i = index.get(id(slot))
            parts.append(previous.state.select(i) if i is not None and previous.state is not None else slot.state)
        return State.cat(parts)

    def _decode(self, lane: list[_Slot], out: list[tuple[Turn, TurnEvent]]) -> None:
        tokens = torch.tensor([[s.feed.pop(0)] for s in lane], dtype=torch.long, device=self.model.device)
        current = self._lane_state(lane)
        spare = self._lane.spare
        if spare is not None and (spare.batch_size != current.batch_size or spare is current):
            spare = None
        logits, state = self.model.forward(tokens, current, out=spare)  # (B, V)
        # The input buffer is the engine's own (built by cat, or last step's output), so it can be written next step.
        self._lane = _Lane(list(lane), state, spare=current)
        if self.on_decode is not None:
            self.on_decode(len(lane))
        for slot in lane:
            slot.consumed += 1
        rows = [i for i, s in enumerate(lane) if s.phase is Phase.DECODE]
        if rows:
            samples = sample_batch(logits[rows, : self.sample_vocab], [lane[i].sampler for i in rows])
            for i, sample in zip(rows, samples):
                self._on_sample(lane[i], sample, out)
        for i, slot in enumerate(lane):
            if slot.phase is Phase.CLOSING and not slot.feed:
                slot.state = state.select(i)
                self._finish(slot, out)

    def _prefill(self, slot: _Slot, out: list[tuple[Turn, TurnEvent]]) -> None:
        chunk, slot.feed = slot.feed[: self.prefill_chunk], slot.feed[self.prefill_chunk :]
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.model.device)
        logits, slot.state = self.model.forward(tokens, slot.state)  # (1, V)
        slot.consumed += len(chunk)
        if slot.feed:
            return
        slot.prefilled_ns = time.time_ns()
        if slot.prefill_only:
            slot.result = Finished(StopReason.MAX_TOKENS, 0, 0, None, 0)
            self._finish(slot, out)
            return
        slot.phase = Phase.DECODE
        (sample,) = sample_batch(logits[:, : self.sample_vocab], [slot.sampler])
        self._on_sample(slot, sample, out)
        if slot.phase is Phase.CLOSING and not slot.feed:
            self._finish(slot, out)

    def _on_sample(self, slot: _Slot, sample: SampleResult, out: list[tuple[Turn, TurnEvent]]) -> None:
        """Turns one sampled token into output and decides whether the turn goes on."""
        token = sample.token_id
        slot.generated.append(token)
        step = slot.checker.step(token)
        is_stop_token = token in slot.params.stop_token_ids
        if is_stop_token:  # not part of the conversation: neither emitted nor fed
            if step.text:
                out.append((slot.turn, Delta(step.text, ())))
        else:
            out.append((slot.turn, Delta(step.text, (token,), (sample,) if slot.params.logprobs > 0 else ())))
        if step.reason is None:
            slot.feed = [token]
            return
        reason = StopReason[step.reason.upper()]
        slot.phase = Phase.CLOSING
        # The last emitted token is fed (the user saw it); a stop string is itself the turn's end, otherwise
        # the template's epilogue closes the reply so the next turn continues a well-formed conversation.
        slot.feed = [] if is_stop_token else [token]
        if reason is not StopReason.STOP_STRING:
            slot.feed += slot.epilogue
            slot.prompt_tokens += len(slot.epilogue)
        slot.result = Finished(
            reason, 0, 0, None, 0,
            stop_string=self._matched_stop_string(slot) if reason is StopReason.STOP_STRING else "",
            stop_token_id=token if reason is StopReason.STOP_TOKEN else -1,
        )

    def _matched_stop_string(self, slot: _Slot) -> str:
        text = self.tokenizer.decode([t for t in slot.generated if t not in slot.params.stop_token_ids])
        found = [(text.find(s), -len(s), s) for s in slot.params.stop_strings if s in text]
        return min(found)[2] if found else ""

    def _finish(self, slot: _Slot, out: list[tuple[Turn, TurnEvent]]) -> None:
        assert slot.result is not None and slot.state is not None
        r = slot.result
        finished = Finished(r.reason, slot.prompt_tokens, len(slot.generated), slot.state, slot.consumed,
                            r.stop_string, r.stop_token_id, slot.timings())
        out.append((slot.turn, finished))
        self._slots.remove(slot)


class StateCache:
    """A small LRU of recent session states keyed by (session id, version): affinity saves the Redis read."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[int, State, int]] = OrderedDict()  # sid -> (version, state, tokens)
        self._bytes = 0
        self.hits = 0  # lookups answered (read by the metrics)
        self.misses = 0

    def get(self, sid: str, version: int) -> tuple[State, int] | None:
        """The cached state of sid if it is exactly at `version` (any other version is stale and dropped)."""
        entry = self._entries.get(sid)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] != version:
            self.misses += 1
            self.pop(sid)
            return None
        self.hits += 1
        self._entries.move_to_end(sid)
        return entry[1], entry[2]

    def put(self, sid: str, version: int, state: State, tokens_consumed: int) -> None:
        self.pop(sid)
        size = state.nbytes
        if size > self.max_bytes:
            return
        self._entries[sid] = (version, state, tokens_consumed)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, old, _) = self._entries.popitem(last=False)
            self._bytes -= old.nbytes

    def pop(self, sid: str) -> None:
        entry = self._entries.pop(sid, None)
        if entry is not None:
            self._bytes -= entry[1].nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: str) -> bool:
        """Whether some version of sid is cached (which one is checked by get())."""
        return sid in self._entries
