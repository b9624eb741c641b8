"""Turns through the front: build the worker request, route it, relay its events, and the Chat stream's
turn queue with cancellation."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rwkv_serve.v1 import api_pb2, common_pb2, worker_pb2
from service.quotas import Quotas
from service.router import Router, WorkerDirectory, WorkerInfo
from service.sessions import Sessions
from worker.errors import InvalidArgument, ModelNotFound, SessionBusy, SessionNotFound, Unavailable
from worker.store import StateStore


@dataclass
class TurnPlan:
    """A turn ready to run: the worker request, where it may run, and what its events have shown so far."""

    request: worker_pb2.RunTurnRequest
    candidates: list[WorkerInfo]
    base_version: int = 0  # the session's state version when the turn was planned
    base_tokens: int = 0
    client_wants_ids: bool = False  # the front always asks the worker for ids, to count tokens exactly
    started: bool = False
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def turn_id(self) -> str:
        return self.request.turn_id


class Turns:
    """Chat turns and completions on behalf of a tenant."""

    def __init__(self, store: StateStore, sessions: Sessions, directory: WorkerDirectory, router: Router, *,
                 busy_retry_s: float = 1.0, quotas: Quotas | None = None) -> None:
        self.store = store
        self.sessions = sessions
        self.directory = directory
        self.router = router
        self.busy_retry_s = busy_retry_s
        self.quotas = quotas or Quotas(store)  # no limits by default

    async def _session_candidates(self, session_id: str, model: str) -> list[WorkerInfo]:
        candidates = await self.directory.for_session(session_id, model)
        if not candidates:
            raise Unavailable(f"no live worker serves model {model!r} of session {session_id}")
        return candidates

    async def plan_chat(self, tenant: str, turn: api_pb2.ChatTurn) -> TurnPlan:
        meta = await self.sessions.get(tenant, turn.session_id)
        request = worker_pb2.RunTurnRequest(  # sampling: the turn's overrides; the worker applies the defaults
            session_id=meta.session_id, model=meta.model, kind=worker_pb2.INPUT_KIND_CHAT, text=turn.text,
            sampling=turn.sampling, turn_id=turn.turn_id, return_token_ids=True,
            expected_state_version=turn.expected_state_version if turn.HasField("expected_state_version") else None)
        return TurnPlan(request, await self._session_candidates(meta.session_id, meta.model), meta.version,
                        meta.state_tokens, client_wants_ids=turn.return_token_ids)

    async def plan_generate(self, tenant: str, req: api_pb2.GenerateRequest) -> TurnPlan:
        request = worker_pb2.RunTurnRequest(kind=worker_pb2.INPUT_KIND_RAW, text=req.prompt, turn_id=req.turn_id,
                                            sampling=req.sampling, return_token_ids=True)
        if req.session_id:
            meta = await self.sessions.get(tenant, req.session_id)
            if req.model and req.model != meta.model:
                raise InvalidArgument(f"session {meta.session_id} runs model {meta.model!r}, not {req.model!r}")
            request.session_id, request.model = meta.session_id, meta.model
            request.commit = not req.ephemeral
            if req.HasField("expected_state_version"):
                request.expected_state_version = req.expected_state_version
            return TurnPlan(request, await self._session_candidates(meta.session_id, meta.model), meta.version,
                            meta.state_tokens, client_wants_ids=req.return_token_ids)
        if not req.model:
            raise InvalidArgument("model is required for a stateless completion")
        if req.ephemeral or req.HasField("expected_state_version"):
            raise InvalidArgument("ephemeral and expected_state_version need a session_id")
        request.model = req.model
        candidates = await self.directory.least_loaded(req.model)
        if not candidates:
            raise ModelNotFound(f"model {req.model!r} is not served by any live worker")
        return TurnPlan(request, candidates, client_wants_ids=req.return_token_ids)

    async def run(self, plan: TurnPlan, deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        """Relays the turn's events from the worker (closing this generator cancels the worker's turn).

        A session whose lease is still held is retried for a moment before ABORTED is returned: a worker drops
        the lease just after it sends turn_end (or one engine step after a cancel), so a client that sends its
        next turn at once would otherwise race it. A turn that really runs elsewhere still gets ABORTED."""
        retry_until = time.monotonic() + self.busy_retry_s
        pause = 0.005
        while True:
            try:
                async for event in self.router.run_turn(plan.request, plan.candidates, deadline):
                    plan.started = True
                    yield self._observe(plan, event)
                return
            except SessionBusy:
                if plan.started or time.monotonic() + pause >= retry_until:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.1)

    async def _metered(self, tenant: str, plan: TurnPlan,
                       deadline: float | None) -> AsyncIterator[common_pb2.ChatEvent]:
        """run() within the tenant's token budget: checked before the turn, charged with what it used after
        (also when it failed or was cancelled part way)."""
        await self.quotas.check_tokens(tenant)
        try:
            async for event in self.run(plan, deadline):
                yield event
        finally:
            if plan.prompt_tokens or plan.generated_tokens:
                with contextlib.suppress(Exception):  # a Redis hiccup must not turn a served turn into an error
                    await self.quotas.charge(tenant, plan.prompt_tokens + plan.generated_tokens)

    @staticmethod
    def _observe(plan: TurnPlan, event: common_pb2.ChatEvent) -> common_pb2.ChatEvent:
        kind = event.WhichOneof("event")
        if kind == "turn_start":
            plan.prompt_tokens = event.turn_start.prompt_tokens
        elif kind == "delta":
            plan.generated_tokens += len(event.delta.token_ids)
            if not plan.client_wants_ids:
                event.delta.ClearField("token_ids")
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
        relay = _ChatInbox()
        reader = asyncio.create_task(relay.read(requests))
        try:
            while (queued := await relay.next_turn()) is not None:
                plan = await self.plan_chat(tenant, queued.turn)
                if queued.cancel.is_set():  # cancelled while waiting behind another turn
                    yield await self.cancelled_end(plan)
                    continue
                relay.running = queued
                try:
                    async for event in _until(self._metered(tenant, plan, deadline), queued.cancel):
                        yield event
                except _Stopped:
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
    """The client side of a Chat stream: turns wait here in order; cancels mark the running or a waiting turn."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[_Queued | None] = asyncio.Queue()
        self._waiting: collections.deque[_Queued] = collections.deque()
        self.running: _Queued | None = None

    async def read(self, requests: AsyncIterator[api_pb2.ChatRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "turn":
                    queued = _Queued(request.turn)
                    self._waiting.append(queued)
                    self._queue.put_nowait(queued)
                elif kind == "cancel":
                    self._cancel(request.cancel.turn_id)
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
        queued = await self._queue.get()
        if queued is not None:
            self._waiting.remove(queued)
        return queued


class _Stopped(Exception):
    """The turn was cancelled by the client."""


async def _until(events: AsyncIterator[common_pb2.ChatEvent], stop: asyncio.Event) -> AsyncIterator[common_pb2.ChatEvent]:
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
