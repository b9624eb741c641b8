"""Turns through the front: build the worker request, route it, relay its events, and the Chat stream's
turn queue with cancellation."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry import trace

from common.errors import (
    InvalidArgument,
    ModelNotFound,
    Overloaded,
    ServeError,
    SessionBusy,
    SessionNotFound,
    Unavailable,
    WorkerLost,
)
from common.sampling import check_sampling
from common.store import StateStore
from common.store.turns import check_turn_id
from common.telemetry import Telemetry, failed, send_context, set_session
from common.worker_api import WorkerLoad
from rwkv_serve.contract import sampling_from_pb
from rwkv_serve.v1 import api_pb2, common_pb2, worker_pb2
from service.convert import template_name
from service.quotas import Quotas
from service.router import Router, WorkerDirectory
from service.sessions import Sessions


@dataclass
class TurnPlan:
    """A turn ready to run: the worker request, where it may run, and what its events have shown so far."""

    request: worker_pb2.RunTurnRequest
    candidates: list[WorkerLoad]
    base_version: int = 0  # the session's state version when the turn was planned
    base_tokens: int = 0
    client_wants_ids: bool = False  # the front always asks the worker for ids, to count tokens exactly
    started: bool = False
    streamed: bool = False  # a delta reached the client: retrying elsewhere would repeat text
    lost_workers: int = 0  # workers that died under this turn
    busy_wait_s: float = 0.0  # how long a held lease is waited for (only right after a cancel: see run())
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def turn_id(self) -> str:
        return self.request.turn_id


class Turns:
    """Chat turns and completions on behalf of a tenant."""

    def __init__(self, store: StateStore, sessions: Sessions, directory: WorkerDirectory, router: Router, *,
                 busy_retry_s: float = 1.0, quotas: Quotas | None = None, max_stream_queue: int = 16,
                 telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.sessions = sessions
        self.directory = directory
        self.router = router
        self.busy_retry_s = busy_retry_s
        self.quotas = quotas or Quotas(store)  # no limits by default
        self.telemetry = telemetry or Telemetry()  # no-op unless the process configured tracing
        self.admission = router.admission  # the front's in-flight bounds, shared with the router
        self.max_stream_queue = max_stream_queue

    async def _session_candidates(self, session_id: str, model: str) -> list[WorkerLoad]:
        candidates = await self.directory.for_session(session_id, model)
        if not candidates:
            raise Unavailable(f"no live worker serves model {model!r} of session {session_id}")
        return candidates

    def _checked(self, plan: TurnPlan) -> TurnPlan:
        """Refuses sampling overrides no worker would take, before the turn reaches one (the worker checks the
        merged parameters again, with its own limits)."""
        vocab = plan.candidates[0].model.vocab_size if plan.candidates else 0
        check_sampling(sampling_from_pb(plan.request.sampling), vocab_size=vocab or None)
        return plan

    async def plan_chat(self, tenant: str, turn: api_pb2.ChatTurn) -> TurnPlan:
        self.sessions.limits.check_input("text", turn.text, turn.messages, session=True)
        check_turn_id(turn.turn_id)  # the worker stores it with the commit (exactly-once retries)
        meta = await self.sessions.get(tenant, turn.session_id)
        request = worker_pb2.RunTurnRequest(  # sampling: the turn's overrides; the worker applies the defaults
            session_id=meta.session_id, model=meta.model, kind=worker_pb2.INPUT_KIND_CHAT, text=turn.text,
            sampling=turn.sampling, turn_id=turn.turn_id, return_token_ids=True, messages=turn.messages,
            expected_state_version=turn.expected_state_version if turn.HasField("expected_state_version") else None)
        return self._checked(TurnPlan(request, await self._session_candidates(meta.session_id, meta.model),
                                      meta.version, meta.state_tokens, client_wants_ids=turn.return_token_ids))

    def _check_generate(self, req: api_pb2.GenerateRequest) -> None:
        """What a GenerateRequest may combine: a prompt or messages (not both, not neither), a template only for
        messages, n within max_choices and above 1 only for a request that commits nothing."""
        limits = self.sessions.limits
        limits.check_input("prompt", req.prompt, req.messages, session=bool(req.session_id))
        if not req.messages and not req.prompt:
            raise InvalidArgument("the request has no input: give a prompt or messages")
        if not req.messages and req.template:
            raise InvalidArgument("template is for messages; a prompt is fed as it is")
        template_name(req.template)  # an unknown number is INVALID_ARGUMENT here, not on the worker
        if req.n < 0 or req.n > limits.max_choices:
            raise InvalidArgument(f"n must be 1-{limits.max_choices} (0 means 1), not {req.n}")
        if req.n > 1 and req.session_id and not req.ephemeral:
            raise InvalidArgument("n > 1 needs a request that commits nothing: stateless, or ephemeral on a session")

    async def plan_generate(self, tenant: str, req: api_pb2.GenerateRequest) -> TurnPlan:
        self._check_generate(req)
        check_turn_id(req.turn_id)
        request = worker_pb2.RunTurnRequest(kind=worker_pb2.INPUT_KIND_RAW, text=req.prompt, turn_id=req.turn_id,
                                            sampling=req.sampling, return_token_ids=True, messages=req.messages,
                                            template=req.template, n=req.n)
        if req.session_id:
            meta = await self.sessions.get(tenant, req.session_id)
            if req.model and req.model != meta.model:
                raise InvalidArgument(f"session {meta.session_id} runs model {meta.model!r}, not {req.model!r}")
            if req.template and template_name(req.template) != meta.template:
                raise InvalidArgument(f"session {meta.session_id} uses the {meta.template!r} template, not "
                                      f"{template_name(req.template)!r}")
            request.session_id, request.model = meta.session_id, meta.model
            request.commit = not req.ephemeral
            if req.HasField("expected_state_version"):
                request.expected_state_version = req.expected_state_version
            return self._checked(TurnPlan(request, await self._session_candidates(meta.session_id, meta.model),
                                          meta.version, meta.state_tokens, client_wants_ids=req.return_token_ids))
        if not req.model:
            raise InvalidArgument("model is required for a stateless completion")
        if req.ephemeral or req.HasField("expected_state_version"):
            raise InvalidArgument("ephemeral and expected_state_version need a session_id")
        request.model = req.model
        candidates = await self.directory.least_loaded(req.model)
        if not candidates:
            raise ModelNotFound(f"model {req.model!r} is not served by any live worker")
        return self._checked(TurnPlan(request, candidates, client_wants_ids=req.return_token_ids))

    async def run(self, plan: TurnPlan, deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        """Relays the turn's events from the worker (closing this generator cancels the worker's turn).

        Overload: the turn takes one of the front's in-flight places (RESOURCE_EXHAUSTED at once when none is
        free; see service.admission).

        One turn at a time per session: a turn on a session whose lease is held gets ABORTED (SessionBusy) at
        once rather than waiting behind a turn of unknown length. A worker releases the lease before it sends
        turn_end, so a client that sends its next turn on seeing turn_end never meets it. The one wait is for
        the turn a Chat stream sends right after cancelling one on the same session (plan.busy_wait_s): that
        lease goes within one engine step.

        A worker that dies under the turn (WorkerLost): its lease is broken at once, and if no text reached the
        client yet the turn runs again on the next worker, from the last committed state (pinned with
        expected_state_version, so a turn the dead worker managed to commit is never applied twice: with a
        turn id the next worker answers it from the commit's record, without one it is ABORTED). Once text
        was streamed a rerun would repeat it, so the client gets UNAVAILABLE with a retry hint instead; its
        retry with the same turn id finds either the session unchanged (the turn runs) or, when the dead worker
        committed before it could send turn_end, the committed result (TurnEnd.replayed)."""
        with self.admission.turn():
            busy_until = time.monotonic() + plan.busy_wait_s
            pause = 0.005
            candidates = plan.candidates
            while True:
                try:
                    async for event in self.router.run_turn(plan.request, candidates, deadline):
                        plan.started = True
                        yield self._observe(plan, event)
                    return
                except SessionBusy:
                    if plan.started or time.monotonic() + pause >= busy_until:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.1)
                except WorkerLost as lost:
                    candidates = await self._after_worker_lost(plan, lost, candidates)

    async def _after_worker_lost(self, plan: TurnPlan, lost: WorkerLost,
                                 candidates: list[WorkerLoad]) -> list[WorkerLoad]:
        """Frees the lost worker's lease; returns where to run the turn again, or raises `lost` when it may not."""
        request = plan.request
        if request.session_id:
            with contextlib.suppress(ServeError):  # Redis gone as well: the lease then expires by its TTL
                await self.store.break_lease(request.session_id, lost.worker_id)
        plan.lost_workers += 1
        remaining = [w for w in candidates if w.worker_id != lost.worker_id]
        if plan.streamed or not remaining or plan.lost_workers >= self.router.max_attempts:
            raise lost
        if request.session_id and not request.HasField("expected_state_version"):
            request.expected_state_version = plan.base_version
        return remaining

    async def _metered(self, tenant: str, plan: TurnPlan,
                       deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        """run() under the turn's `route` span and within the tenant's token budget: checked before the turn,
        charged with what it used after (also when it failed or was cancelled part way).

        The route span's context goes to the worker in the call's metadata (send_context). It is set again after
        every event: a Chat stream reads each event in a task of its own (_until), and a retry on another
        worker may start in any of them."""
        session_id = plan.request.session_id
        set_session(session_id)
        span = self.telemetry.tracer.start_span("route", attributes={
            "rwkv.session_id": session_id, "rwkv.turn_id": plan.turn_id, "rwkv.model": plan.request.model,
            "rwkv.candidates": len(plan.candidates)})
        route = trace.set_span_in_context(span)
        send_context(route)
        try:
            await self.quotas.check_tokens(tenant)
            async for event in self.run(plan, deadline):
                if event.WhichOneof("event") == "turn_start":
                    span.set_attribute("rwkv.worker_id", event.turn_start.worker_id)
                yield event
                send_context(route)
        except Exception as exc:
            failed(span, exc)
            raise
        finally:
            span.set_attribute("rwkv.prompt_tokens", plan.prompt_tokens)
            span.set_attribute("rwkv.generated_tokens", plan.generated_tokens)
            span.end()
            if plan.prompt_tokens or plan.generated_tokens:
                with contextlib.suppress(Exception):  # a Redis hiccup must not turn a served turn into an error
                    await self.quotas.charge(tenant, plan.prompt_tokens + plan.generated_tokens)

    @staticmethod
    def _observe(plan: TurnPlan, event: common_pb2.ChatEvent) -> common_pb2.ChatEvent:
        kind = event.WhichOneof("event")
        if kind == "turn_start":
            plan.prompt_tokens = event.turn_start.prompt_tokens
        elif kind == "delta":
            plan.streamed = True
            plan.generated_tokens += len(event.delta.token_ids)
            if not plan.client_wants_ids:
                event.delta.ClearField("token_ids")
        elif kind == "turn_end" and event.turn_end.replayed:
            plan.prompt_tokens = plan.generated_tokens = 0  # a stored result: nothing was computed this time
        return event

    async def cancelled_end(self, plan: TurnPlan) -> common_pb2.ChatEvent:
        """The turn_end the front sends for a turn it cancelled (the worker's stream is gone by then)."""
        version = plan.base_version
        if plan.request.session_id:
            # The worker may have committed just before the cancel reached it: report the version as stored.
            with contextlib.suppress(SessionNotFound):
                version = await self.store.get_version(plan.request.session_id)
        usage = common_pb2.Usage(prompt_tokens=plan.prompt_tokens, generated_tokens=plan.generated_tokens,
                                 state_tokens=plan.base_tokens)
        end = common_pb2.TurnEnd(stop_reason=common_pb2.STOP_REASON_CANCELLED, usage=usage, state_version=version)
        return common_pb2.ChatEvent(turn_id=plan.turn_id, turn_end=end)

    async def generate(self, tenant: str, req: api_pb2.GenerateRequest,
                       deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        plan = await self.plan_generate(tenant, req)
        async for event in self._metered(tenant, plan, deadline):
            yield event

    async def chat(self, tenant: str, requests: AsyncIterator[api_pb2.ChatRequest],
                   deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        """The Chat stream: runs the client's turns in order, relays their events, honours cancels."""
        relay = _ChatInbox(self.max_stream_queue)
        reader = asyncio.create_task(relay.read(requests))
        settling = ""  # the session of the turn this stream just cancelled: its lease goes within one step
        try:
            while (queued := await relay.next_turn()) is not None:
                plan = await self.plan_chat(tenant, queued.turn)
                if queued.cancel.is_set():  # cancelled while waiting behind another turn
                    yield await self.cancelled_end(plan)
                    continue
                if plan.request.session_id == settling:
                    plan.busy_wait_s = self.busy_retry_s
                settling = ""
                relay.running = queued
                try:
                    async for event in _until(self._metered(tenant, plan, deadline), queued.cancel):
                        yield event
                except _Stopped:
                    relay.check()  # stopped because the stream overflowed: it ends here
                    settling = plan.request.session_id
                    yield await self.cancelled_end(plan)
                finally:
                    relay.running = None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


@dataclass(eq=False)
class _Queued:
    turn: api_pb2.ChatTurn
    cancel: asyncio.Event = field(default_factory=asyncio.Event)


class _ChatInbox:
    """The client side of a Chat stream: turns wait here in order; cancels mark the running or a waiting turn.

    At most `max_waiting` turns wait; one more ends the stream at once with RESOURCE_EXHAUSTED (the running
    turn is cancelled, its session left as it was): a client cannot make the front hold an unbounded queue."""

    def __init__(self, max_waiting: int = 16) -> None:
        self._queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._waiting: collections.deque[_Queued] = collections.deque()
        self.running: _Queued | None = None
        self.max_waiting = max_waiting
        self.error: ServeError | None = None

    def check(self) -> None:
        """Raises the error that ended the stream, if any."""
        if self.error is not None:
            raise self.error

    async def read(self, requests: AsyncIterator[api_pb2.ChatRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "turn":
                    if len(self._waiting) >= self.max_waiting:
                        self.error = Overloaded(f"at most {self.max_waiting} turns may wait on one Chat stream; "
                                                "wait for turn_end before sending more", retry_after_s=1.0)
                        if self.running is not None:
                            self.running.cancel.set()
                        return
                    queued = _Queued(request.turn)
                    self._waiting.append(queued)
                    self._queue.put_nowait(queued)
                elif kind == "cancel":
                    self._cancel(request.cancel.turn_id)
        except ServeError as exc:  # e.g. a message that does not parse (service.wire): the stream ends with it
            self.error = exc
            if self.running is not None:
                self.running.cancel.set()
        finally:
            self._queue.put_nowait(None)  # half-close: the turns already sent still run

    def _cancel(self, turn_id: str) -> None:
        running = self.running
        if running is not None and (not turn_id or running.turn.turn_id == turn_id):
            running.cancel.set()
            return
        for queued in self._waiting:  # nothing running (or another turn): the named, else the next, waiting turn
            if not turn_id or queued.turn.turn_id == turn_id:
                queued.cancel.set()
                return

    async def next_turn(self) -> _Queued | None:
        self.check()
        queued = await self._queue.get()
        self.check()
        if queued is not None:
            self._waiting.remove(queued)
        return queued


class _Stopped(Exception):
    """The turn was cancelled by the client."""


async def _until(events: AsyncIterator[common_pb2.ChatEvent],
                 stop: asyncio.Event) -> AsyncIterator[common_pb2.ChatEvent]:
    """Yields from `events` until it ends or `stop` is set; then closes it (cancelling the worker call) and
    raises _Stopped."""
    stop_wait = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait((step, stop_wait), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise _Stopped
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stop_wait.cancel()
        if step is not None and not step.done():
            # Cancelling the pending read throws CancelledError into the relay, whose finally cancels the
            # worker call; the generator is then finished.
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await step
        await events.aclose()
