"""The engine's loop: submitting turns, their Turn handles, the engine thread and its bridge to asyncio.

One step (Engine.step_sync) reads as three verbs: the scheduler plans it, the batch runner runs it, the
scheduler postprocesses the samples into events. While there is work the engine thread steps back to back and
hands each step's events to the event loop (call_soon_threadsafe), so the loop stays responsive.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from worker.engine.batch import BatchRunner
from worker.engine.events import EngineEvent, EngineLoad, Finished, StepRecord
from worker.engine.pacing import DEFAULT_PREFILL_COST_SLACK, DEFAULT_PREFILL_GATHER_MS, PrefillPacer
from worker.engine.scheduler import DEFAULT_PREFILL_TOKEN_BUDGET, Scheduler, Seq, Step
from worker.model import RWKV5
from worker.sampler import SamplerState, SamplingParams, StopChecker
from worker.state import State

if TYPE_CHECKING:
    from worker.constraints import ConstraintCompiler, ConstraintLimits, TurnConstraint

log = logging.getLogger("worker.engine")

Delivery = tuple["Turn", EngineEvent | Exception]


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


class Turn:
    """Handle of a submitted turn: iterate it for events (ending with Finished); cancel() to stop it."""

    def __init__(self, turn_id: int, engine: Engine, seq: Seq) -> None:
        self.id = turn_id
        self._engine = engine
        self._seq = seq
        self._events: asyncio.Queue[EngineEvent | Exception] = asyncio.Queue()
        self.done = False

    @property
    def cancelled(self) -> bool:
        return self._seq.cancelled

    def cancel(self) -> None:
        """Stops the turn at the next step boundary; its batch slot is freed within one step."""
        if not self.done:
            self._seq.cancelled = True  # read by the engine thread at step boundaries
            self._engine._wake()

    async def next_event(self) -> EngineEvent:
        """The next event; raises the engine's exception if the step running this turn failed."""
        event = await self._events.get()
        if isinstance(event, BaseException):
            raise event
        return event

    def poll(self) -> EngineEvent | None:
        """The next event if one is already delivered (None otherwise); raises like next_event()."""
        if self._events.empty():
            return None
        event = self._events.get_nowait()
        if isinstance(event, BaseException):
            raise event
        return event

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        while True:
            event = await self.next_event()
            yield event
            if isinstance(event, Finished):
                return


def _record(step: Step, started: float) -> StepRecord:
    """The trace record of a step that ran (before its postprocessing: feeds are what is left after this step)."""
    arrivals = tuple(s.submitted_ns / 1e9 for g in step.prefill for s, chunk in zip(g.seqs, g.tokens, strict=True)
                     if len(chunk) + len(s.feed) == s.prompt_tokens)  # turns whose input starts this step
    return StepRecord(started, time.time() - started, len(step.decode), step.prefill_tokens,
                      sum(len(g.seqs) for g in step.prefill), arrivals)


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
        prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
        prefill_cost_slack: float | None = DEFAULT_PREFILL_COST_SLACK,
        prefill_burst_streams: int | None = None,
        prefill_gather_ms: float = DEFAULT_PREFILL_GATHER_MS,
        max_tokens_limit: int | None = None,
        constraints: ConstraintCompiler | None = None,
        constraint_limits: ConstraintLimits | None = None,
    ) -> None:
        if max_batch < 1 or max_queued < 0 or prefill_chunk < 1 or prefill_token_budget < 0:
            raise ValueError("max_batch and prefill_chunk must be positive, max_queued and prefill_token_budget "
                             "non-negative")
        if prefill_cost_slack is not None and prefill_cost_slack < 0:
            raise ValueError("prefill_cost_slack must be non-negative (or None: the token budget alone)")
        if prefill_burst_streams is not None and prefill_burst_streams < 0:
            raise ValueError("prefill_burst_streams must be non-negative (or None: max_batch // 4)")
        if prefill_gather_ms < 0:
            raise ValueError("prefill_gather_ms must be non-negative (0: no gathering)")
        self.model = model
        self.tokenizer = tokenizer
        # Sample only ids the tokenizer can decode: World models have 65536 output rows but 65530 tokens, and a
        # random or poorly trained model does pick the 6 spare rows (one such id used to fail the whole batch).
        self.sample_vocab = min(model.config.vocab_size, getattr(tokenizer, "vocab_size", model.config.vocab_size))
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.prefill_chunk = prefill_chunk
        self.prefill_token_budget = prefill_token_budget
        self.prefill_cost_slack = prefill_cost_slack
        self.max_tokens_limit = max_tokens_limit
        # Beside a decode lane, prefill chunks after the first join a step only within the slack of its measured
        # cost (worker/engine/pacing.py); None: the token budget alone.
        # A burst spread over several steps may hold back up to prefill_burst_streams streams for a step (a budget).
        burst = max_batch // 4 if prefill_burst_streams is None else prefill_burst_streams
        # A burst still arriving (turns a few ms apart) is gathered into one prefill step, within the rent-or-buy
        # bound of pacing.py.
        pacer = (PrefillPacer(prefill_cost_slack, burst, gather_s=prefill_gather_ms / 1e3)
                 if prefill_cost_slack is not None else None)
        self.scheduler = Scheduler(max_batch=max_batch, max_queued=max_queued, prefill_chunk=prefill_chunk,
                                   tokenizer=tokenizer, prefill_token_budget=prefill_token_budget, pacer=pacer)
        self.batch_runner = BatchRunner(model, self.sample_vocab)
        # response_format compiler: given (the worker builds it at start-up), or built on the first turn with one
        self._constraints = constraints
        self._constraint_limits = constraint_limits
        self._constraints_lock = threading.Lock()
        if constraints is not None:
            self._attach_masks(constraints)
        self._ids = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkv-engine")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.on_step: Callable[[StepRecord], None] | None = None  # trace hook: each step (in the engine thread)

    @property
    def on_decode(self) -> Callable[[int], None] | None:
        """Metrics hook: called with each decode step's batch size (in the engine thread)."""
        return self.batch_runner.on_decode

    @on_decode.setter
    def on_decode(self, hook: Callable[[int], None] | None) -> None:
        self.batch_runner.on_decode = hook

    # ---- submitting -----------------------------------------------------------------------------------------

    @property
    def constraints(self) -> ConstraintCompiler:
        """The response_format compiler (llguidance over this engine's vocabulary), built on first use."""
        with self._constraints_lock:  # the worker warms it in a thread while a first turn may already ask
            if self._constraints is None:
                from worker.constraints import ConstraintCompiler  # noqa: PLC0415 - only engines that see one

                compiler = ConstraintCompiler(self.tokenizer, self._constraint_limits)
                self._attach_masks(compiler)
                self._constraints = compiler
            return self._constraints

    def _attach_masks(self, compiler: ConstraintCompiler) -> None:
        from worker.constraints import MaskFiller  # noqa: PLC0415

        if compiler.vocab_size < self.sample_vocab:
            raise ValueError(f"the constraint compiler's vocabulary ({compiler.vocab_size}) is smaller than the "
                             f"sampled one ({self.sample_vocab})")
        self.batch_runner.masks = MaskFiller(compiler)

    def _constrain(self, params: SamplingParams) -> tuple[SamplingParams, TurnConstraint]:
        """The turn's compiled response_format, and its parameters for the sampler: the end-of-text token is never
        banned there (the grammar allows it only where the output may end)."""
        constraint = self.constraints.compile(params.response_format or {})
        if constraint.eos_id in params.banned_tokens:
            params = replace(params, banned_tokens=tuple(t for t in params.banned_tokens if t != constraint.eos_id))
        return params, constraint

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
        constraint = None
        sampler_params = params
        if params.response_format is not None and not request.prefill_only:
            sampler_params, constraint = self._constrain(params)
        # A constrained turn ends where its grammar does: no stop strings or stop tokens, max_tokens still.
        stops = replace(params, stop_token_ids=(), stop_strings=()) if constraint is not None else params
        seq = Seq(
            params=params,
            feed=tokens,
            epilogue=[int(t) for t in request.epilogue],
            state=request.state,
            consumed=request.tokens_consumed,
            sampler=SamplerState(sampler_params),
            checker=StopChecker.from_params(stops, self.tokenizer),
            prefill_only=request.prefill_only,
            constraint=constraint,
            deadline=request.deadline,
            prompt_tokens=len(tokens),
            submitted_ns=time.time_ns(),
        )
        turn = seq.turn = Turn(next(self._ids), self, seq)
        self.scheduler.add(seq)
        self._wake()
        return turn

    @property
    def load(self) -> EngineLoad:
        return self.scheduler.load

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    # ---- one step (engine thread) -----------------------------------------------------------------------------

    def step_sync(self) -> list[Delivery]:
        """Runs one engine step; returns the events to deliver, in order. Call from one thread at a time."""
        started = time.time() if self.on_step is not None else 0.0
        step = self.scheduler.schedule()  # drop, admit; the decode lane and the prefill groups
        result = self.batch_runner.run(step)  # the forwards and the sampling
        if self.on_step is not None and not step.empty:
            self.on_step(_record(step, started))
        return self.scheduler.postprocess(step, result)  # deltas, stops, finished turns and their states

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
                log.exception("engine step failed; failing the %d turns in the batch", len(self.scheduler.running))
                deliveries = self._fail_batch(exc)
            try:
                if deliveries:
                    loop.call_soon_threadsafe(self._deliver, deliveries)
            except RuntimeError:  # the event loop is closed: nobody is left to deliver to
                return
            if self.scheduler.sleep_s:  # a burst is still arriving and nothing else runs (pacing.py)
                time.sleep(self.scheduler.sleep_s)

    def _fail_batch(self, exc: Exception) -> list[Delivery]:
        """Drops every admitted turn (engine thread, after its step raised); waiting turns go on."""
        self.batch_runner.reset()
        return self.scheduler.fail_running(exc)

    def _deliver(self, deliveries: list[Delivery]) -> None:
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
        self.scheduler.cancel_all()
        self._wake()
        if self._task is not None:
            await self.drain(5.0)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True)
        if self.batch_runner.masks is not None:
            self.batch_runner.masks.close()
