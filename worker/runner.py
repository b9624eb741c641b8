"""Runs one turn end to end on a worker: lease -> state -> format -> engine -> stream -> commit -> release.

The plain object behind the WorkerService servicer (which only converts protobuf). Where a session's state
comes from and how it becomes a record: worker/session_state.py. A retried turn id that the session already
committed is answered from its stored result (common/store/turns.py), never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from opentelemetry import trace

from common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelNotFound,
    StoreUnavailable,
    VersionConflict,
)
from common.store import Lease, SessionMeta, StateStore
from common.store.turns import TURN_RESULT_TTL_MS, TurnRecord
from common.telemetry import Telemetry, set_session
from common.worker_api import (
    InputKind,
    PreparedState,
    TextDelta,
    TokenLogprob,
    TurnEnded,
    TurnEvent,
    TurnInput,
    TurnStarted,
    merge_sampling,
)
from rwkv_serve.contract import StopReason
from worker.engine import Delta, Engine, Finished, Turn, TurnRequest
from worker.sampler import SamplingParams
from worker.session_state import StateSource
from worker.state import (
    State,
)
from worker.state_cache import StateCache
from worker.templates import ChatTemplate, get_template

log = logging.getLogger(__name__)

_PARAM_FIELDS = {f.name for f in fields(SamplingParams)}
_TUPLE_FIELDS = ("banned_tokens", "stop_token_ids", "stop_strings")
_LONG_TEXT = 4096  # characters; longer texts are tokenized off the event loop


def sampling_params(sampling: Mapping[str, Any], extra_stop_strings: tuple[str, ...] = ()) -> SamplingParams:
    """SamplingParams from a dict of set fields; the template's stop strings are always added."""
    unknown = set(sampling) - _PARAM_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown sampling fields {sorted(unknown)}")
    values = {k: (tuple(v) if k in _TUPLE_FIELDS else v) for k, v in sampling.items()}
    if extra_stop_strings:
        values["stop_strings"] = tuple(dict.fromkeys((*values.get("stop_strings", ()), *extra_stop_strings)))
    return SamplingParams(**values)


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's knobs (from the worker settings)."""

    model_id: str
    worker_id: str
    lease_ms: int = 30_000  # renewed every third of it while a turn runs
    prefix_ttl_ms: int = 86_400_000
    default_sampling: Mapping[str, Any] | None = None  # worker defaults under session defaults
    max_prompt_tokens: int = 16_384  # a turn's input (formatted text + token ids); longer is INVALID_ARGUMENT
    state_storage_dtype: str = "fp32"  # what the records written to Redis keep their tensors in (STORAGE_DTYPES)
    turn_result_ttl_ms: int = TURN_RESULT_TTL_MS  # how long a committed turn stays replayable under its turn id
    fault_after_commit: str = ""  # TEST ONLY: "exit" = os._exit(1) right after a commit, before turn_end


class TurnRunner:
    """Runs turns against the store and the engine; yields domain events (TurnStarted, TextDelta, TurnEnded)."""

    def __init__(self, engine: Engine, store: StateStore, tokenizer, config: RunnerConfig, cache: StateCache,
                 telemetry: Telemetry | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry or Telemetry()  # spans and metrics (no-ops unless the process configured them)
        self.store = store
        self.tokenizer = tokenizer
        self.config = config
        self.cache = cache
        self.model = engine.model
        self.states = StateSource(store, self.model, cache, config, self.tokenize, self._prefill)

    # ---- public -----------------------------------------------------------------------------------------

    async def tokenize(self, text: str) -> list[int]:
        if len(text) > _LONG_TEXT:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    async def run(self, turn: TurnInput, deadline: float | None = None) -> AsyncIterator[TurnEvent]:
        """Runs one turn; `deadline` is in time.monotonic() seconds. Raises ServeError subclasses."""
        set_session(turn.session_id)  # for the logs of this RPC's task
        if turn.model and turn.model != self.config.model_id:
            raise ModelNotFound(f"this worker serves {self.config.model_id!r}, not {turn.model!r}")
        if not turn.session_id:
            if turn.kind is InputKind.CHAT:
                raise InvalidArgument("a chat turn needs a session")
            events = self._stateless(turn, deadline)
        elif not turn.commit:
            events = self._ephemeral(turn, deadline)
        else:
            events = self._session_turn(turn, deadline)
        # aclosing: when the caller stops early (client cancel, disconnect), the inner generator's finally (which
        # frees the batch slot and the lease) runs now, not whenever the garbage collector reaches it.
        async with contextlib.aclosing(events):
            with self.telemetry.turn_span(session_id=turn.session_id, turn_id=turn.turn_id, kind=turn.kind.value,
                                          model=self.config.model_id, worker_id=self.config.worker_id) as watch:
                if watch.text is not None:
                    log.debug("turn %s input: %r", turn.turn_id, turn.text)
                replay = False
                async for event in events:
                    if isinstance(event, TurnStarted) and event.replayed:
                        replay = True  # a stored result: no tokens were generated, nothing to time
                    elif replay:
                        pass
                    elif isinstance(event, TextDelta):
                        watch.delta(len(event.token_ids), event.text)
                    elif isinstance(event, TurnEnded):
                        watch.ended(event.prompt_tokens, event.generated_tokens, event.reason.label)
                        if watch.text is not None:
                            log.debug("turn %s reply: %r", turn.turn_id, "".join(watch.text))
                    yield event

    async def prepare_state(self, source: str, data: bytes) -> PreparedState:
        """An uploaded preset state checked against this model (worker.session_state.StateSource.prepare)."""
        return await self.states.prepare(source, data)

    # ---- the three kinds of turn ------------------------------------------------------------------------

    async def _stateless(self, turn: TurnInput, deadline: float | None) -> AsyncIterator[TurnEvent]:
        request = await self._request(turn, get_template("raw"), {}, None, 0)
        async for event in self._generate(request, deadline):
            if isinstance(event, Finished):
                yield self._ended(event, 0)
            else:
                yield event

    async def _ephemeral(self, turn: TurnInput, deadline: float | None) -> AsyncIterator[TurnEvent]:
        meta = await self._meta(turn)
        with self.telemetry.span("state.load", self.telemetry.state_load, session_id=meta.session_id):
            state, consumed = await self.states.load(meta)
        request = await self._request(turn, get_template(meta.template), meta.sampling, state, consumed)
        async for event in self._generate(request, deadline):
            yield self._ended(event, meta.version, meta.state_tokens) if isinstance(event, Finished) else event

    async def _session_turn(self, turn: TurnInput, deadline: float | None) -> AsyncIterator[TurnEvent]:
        # Two store round trips per turn: the lease with the session's meta (and, unless the local cache should
        # hit, its state bytes) in one, the commit with the lease's release in the other. A turn the session
        # already committed under this turn id (its worker died before sending turn_end) gets the stored result
        # from the first round trip instead, before any version check: it is never applied twice.
        sid = turn.session_id
        digest = _input_digest(turn) if turn.turn_id else ""
        begun = await self.store.begin_or_replay(sid, self.config.lease_ms, holder=self.config.worker_id,
                                                 with_state=not self.states.cached(sid), turn_id=turn.turn_id,
                                                 input_digest=digest)
        if isinstance(begun, TurnRecord):
            for replayed in self._replay(sid, begun):
                yield replayed
            return
        lease, meta, data = begun
        renewal = asyncio.create_task(self._keep_lease(lease))
        released = False
        texts: list[str] = []  # the reply as the client receives it: the turn's record, if it commits
        token_ids: list[int] = []
        input_tokens = 0
        try:
            self._check_meta(turn, meta)
            with self.telemetry.span("state.load", self.telemetry.state_load, session_id=meta.session_id):
                state, consumed = await self.states.load(meta, data)
            del data  # the decoded state is all that is needed now
            request = await self._request(turn, get_template(meta.template), meta.sampling, state, consumed)
            async for event in self._generate(request, deadline, renewal):
                if not isinstance(event, Finished):
                    if isinstance(event, TextDelta):
                        texts.append(event.text)
                        token_ids.extend(event.token_ids)
                    elif isinstance(event, TurnStarted):
                        input_tokens = event.prompt_tokens
                    yield event
                    continue
                if event.state is None:  # cancelled: the stored state stays as it was
                    ended = self._ended(event, meta.version, meta.state_tokens)
                    released = True
                    await self._release(lease, renewal)
                else:
                    # Commit and release in one call, and only then turn_end: a client that sends its next turn
                    # the moment it sees this one end must find the session free. (If the commit fails, the
                    # finally below releases the lease: a no-op when the commit script already did.)
                    record = _record(turn, digest, event, "".join(texts), token_ids, input_tokens) \
                        if turn.turn_id else None
                    version = await self._commit(lease, meta, event, record)
                    released = True
                    self._stop_renewal(renewal)
                    if self.config.fault_after_commit == "exit":  # TEST ONLY (WorkerSettings.fault_after_commit)
                        log.error("fault injection: exiting after the commit of %s version %d, before turn_end",
                                  sid, version)
                        os._exit(1)
                    ended = self._ended(event, version)
                yield ended
        finally:
            if not released:
                await self._release(lease, renewal)

    def _replay(self, sid: str, record: TurnRecord) -> list[TurnEvent]:
        """The events of a turn already committed, from its record: started, its whole text in one delta (no
        logprobs: they are not stored), ended as it was, each marked as a replay."""
        log.info("turn %s of session %s was committed already (version %d): replaying its result",
                 record.turn_id, sid, record.state_version)
        trace.get_current_span().set_attribute("rwkv.replayed", True)
        return [
            TurnStarted(record.input_tokens, self.config.worker_id, replayed=True),
            TextDelta(record.text, record.token_ids),
            TurnEnded(StopReason(record.stop_reason), record.prompt_tokens, record.generated_tokens,
                      record.state_tokens, record.state_version, record.stop_string, record.stop_token_id,
                      replayed=True),
        ]

    @staticmethod
    def _stop_renewal(renewal: asyncio.Task[None]) -> None:
        if renewal.done() and not renewal.cancelled():
            renewal.exception()  # retrieved: it already surfaced through _next as LeaseLost (or lost the race
            # with the commit that released the lease)
        renewal.cancel()

    async def _release(self, lease: Lease, renewal: asyncio.Task[None]) -> None:
        """Stops renewing the lease and releases it (it expires on its own if Redis cannot be reached)."""
        self._stop_renewal(renewal)
        try:
            # Shielded: a call cancelled now (its deadline, the client gone) must still let the lease go, or the
            # session stays busy until the lease's TTL.
            await asyncio.shield(self.store.release_lease(lease))
        except Exception:  # never mask the turn's own outcome
            log.warning("could not release lease on %s", lease.session_id, exc_info=True)

    # ---- steps ------------------------------------------------------------------------------------------

    async def _meta(self, turn: TurnInput) -> SessionMeta:
        return self._check_meta(turn, await self.store.get_session(turn.session_id))

    def _check_meta(self, turn: TurnInput, meta: SessionMeta) -> SessionMeta:
        if meta.model != self.config.model_id:
            raise InvalidArgument(f"session {meta.session_id} runs on model {meta.model!r}, "
                                  f"this worker serves {self.config.model_id!r}")
        if turn.expected_version is not None and turn.expected_version != meta.version:
            raise VersionConflict(f"session {meta.session_id} is at version {meta.version}, "
                                  f"not {turn.expected_version}")
        return meta

    async def _prefill(self, tokens: list[int], base: State | None) -> Finished:
        """Feeds `tokens` onto `base` through the engine and returns the finished turn (its state)."""
        finished = None
        async for event in self._generate(TurnRequest(tokens, state=base, prefill_only=True), None):
            finished = event
        assert isinstance(finished, Finished) and finished.state is not None
        return finished

    async def _request(
        self, turn: TurnInput, template: ChatTemplate, session_sampling: Mapping[str, Any],
        state: State | None, consumed: int,
    ) -> TurnRequest:
        chat = turn.kind is InputKind.CHAT
        text = template.user_turn(turn.text) if chat else turn.text
        tokens = [*(await self.tokenize(text) if text else []), *turn.token_ids]
        sampling = merge_sampling(self.config.default_sampling, session_sampling, turn.sampling)
        params = sampling_params(sampling, template.stop_strings if chat else ())
        epilogue = await self.tokenize(template.epilogue()) if chat and template.epilogue() else []
        if not tokens:
            raise InvalidArgument("the turn has no input (empty text and no token ids)")
        if len(tokens) > self.config.max_prompt_tokens:
            raise InvalidArgument(f"the turn's input is {len(tokens)} tokens; the limit is "
                                  f"{self.config.max_prompt_tokens}")
        return TurnRequest(tokens, params, state=state, tokens_consumed=consumed, epilogue=epilogue)

    async def _generate(
        self, request: TurnRequest, deadline: float | None, renewal: asyncio.Task[None] | None = None
    ) -> AsyncIterator[TurnEvent | Finished]:
        """Submits to the engine and relays its events; cancels the engine turn if the caller goes away."""
        if deadline is not None:  # the engine drops the turn unrun if the deadline passes while it waits
            request = replace(request, deadline=deadline)
        turn: Turn = self.engine.submit(request)
        try:
            if not request.prefill_only:
                yield TurnStarted(len(request.tokens), self.config.worker_id)
            while True:
                event = await self._next(turn, deadline, renewal)
                if isinstance(event, Finished):
                    # The engine thread's phases, as child spans of the current one.
                    self.telemetry.phase_spans(event.timings, decoded=event.generated_tokens > 0)
                    yield event
                    return
                yield _delta(event)
        finally:
            turn.cancel()  # no-op once finished; otherwise frees the batch slot within one step

    async def _next(self, turn: Turn, deadline: float | None, renewal: asyncio.Task[None] | None) -> Delta | Finished:
        # Fast path (a backlog of delivered events): no task and no asyncio.wait per token, same checks.
        if (renewal is None or not renewal.done()) and (deadline is None or time.monotonic() < deadline):
            ready = turn.poll()
            if ready is not None:
                return ready
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(turn.next_event())}
        if renewal is not None:
            waiters.add(renewal)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        (getter,) = [w for w in waiters if w is not renewal]
        if getter in done:
            return getter.result()
        getter.cancel()
        if renewal is not None and renewal in done:
            renewal.result()  # raises LeaseLost
        raise DeadlineExceeded("the turn's deadline passed")

    async def _keep_lease(self, lease: Lease) -> None:
        """Renews the lease every third of its TTL; raises LeaseLost (ending the turn) when it was taken.

        A renewal that cannot reach Redis is skipped: the next one, or the commit, finds out whether the lease
        survived (both check the token), so a short Redis blip does not end a running turn."""
        while True:
            await asyncio.sleep(lease.ttl_ms / 3000)
            try:
                await self.store.renew_lease(lease)
            except StoreUnavailable:
                log.warning("could not renew the lease on %s; retrying", lease.session_id)

    async def _commit(self, lease: Lease, meta: SessionMeta, finished: Finished, record: TurnRecord | None = None
                      ) -> int:
        state = finished.state
        assert state is not None
        with self.telemetry.span("state.commit", self.telemetry.state_commit, session_id=meta.session_id) as span:
            host = await asyncio.to_thread(state.to, "cpu")
            data = await asyncio.to_thread(self.states.encode, host, finished.tokens_consumed)
            version = await self.store.commit_and_release(lease, meta.version, data,
                                                          state_tokens=finished.tokens_consumed, record=record,
                                                          record_ttl_ms=self.config.turn_result_ttl_ms)
            span.set_attribute("rwkv.state_bytes", len(data))
            span.set_attribute("rwkv.state_version", version)
        self.telemetry.state_size.record(len(data))
        self.cache.put(meta.session_id, version, host, finished.tokens_consumed)
        return version

    @staticmethod
    def _ended(finished: Finished, version: int, state_tokens: int | None = None) -> TurnEnded:
        """The domain event; state_tokens overrides the engine's count when the state was not kept."""
        return TurnEnded(
            finished.reason, finished.prompt_tokens, finished.generated_tokens,
            finished.tokens_consumed if state_tokens is None else state_tokens, version,
            finished.stop_string, finished.stop_token_id,
        )


def _input_digest(turn: TurnInput) -> str:
    """What a turn asks for (kind, text, token ids, sampling overrides), hashed: a turn id reused for another input
    is a new turn, not a replay of the old one."""
    what = json.dumps([turn.kind.value, turn.text, list(turn.token_ids), dict(turn.sampling)], sort_keys=True,
                      default=list)
    return hashlib.sha256(what.encode()).hexdigest()[:32]


def _record(turn: TurnInput, digest: str, finished: Finished, text: str, token_ids: list[int],
            input_tokens: int) -> TurnRecord:
    """The result a retry of this turn gets back (stored with the commit)."""
    return TurnRecord(turn.turn_id, digest, text, tuple(token_ids), finished.prompt_tokens,
                      finished.generated_tokens, finished.tokens_consumed, int(finished.reason),
                      finished.stop_string, finished.stop_token_id, input_tokens=input_tokens)


def _delta(event: Delta) -> TextDelta:
    logprobs = tuple(TokenLogprob(s.token_id, s.logprob, tuple(s.top_logprobs)) for s in event.logprobs)
    return TextDelta(event.text, event.token_ids, logprobs)

