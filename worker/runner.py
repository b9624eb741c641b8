"""Runs one turn end to end on a worker: lease -> state -> format -> engine -> stream -> commit -> release.

The plain object behind the WorkerService servicer (which only converts protobuf). Where a session's state
comes from and how it becomes a record: worker/session_state.py. A retried turn id that the session already
committed is answered from its stored result (common/store/turns.py), never run twice.

A turn's input is text (or token ids) or whole messages (common/templates.py render_messages, each piece tokenized
alone). A stateless turn with messages resumes from the shared prefix-state cache (worker/prefix_cache.py): every
message but the last is prefilled as a segment of its own, its boundary stored; the last one is the generating
turn's input. n > 1 choices (only for turns that commit nothing): the prompt but its last token is prefilled once,
and n engine turns (seeds seed, seed+1, ... when a seed is set) each feed that last token onto a copy of the state
and sample their own reply; their events carry their choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry import trace

from common.errors import (
    InvalidArgument,
    ModelNotFound,
    StoreUnavailable,
    VersionConflict,
)
from common.store import Lease, SessionMeta, StateStore
from common.store.turns import TurnRecord
from common.telemetry import Telemetry, set_session
from common.templates import ChatTemplate, get_template
from common.worker_api import (
    InputKind,
    PreparedState,
    TextDelta,
    TurnEnded,
    TurnEvent,
    TurnInput,
    TurnStarted,
    merge_sampling,
)
from rwkv_serve.contract import StopReason
from worker.choices import next_event
from worker.engine import Engine, Finished, Turn, TurnRequest
from worker.prompts import Prompt, PromptBuilder
from worker.session_state import StateSource
from worker.state import State
from worker.state_cache import StateCache
from worker.turn_config import RunnerConfig, sampling_params
from worker.turn_records import input_digest, text_delta, turn_record

log = logging.getLogger(__name__)

_LONG_TEXT = 4096  # characters; longer texts are tokenized off the event loop


@dataclass(frozen=True)
class _Done:
    """One choice's engine turn finished."""

    choice: int
    finished: Finished


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
        self.prefixes = self.states.prefixes  # the shared prefix-state cache (worker/prefix_cache.py)
        self.prompts = PromptBuilder(self.tokenize, max_messages=config.max_messages,
                                     max_prompt_tokens=config.max_prompt_tokens)

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
            if turn.kind is InputKind.CHAT and not turn.messages:
                raise InvalidArgument("a chat turn needs a session (or messages)")
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
        self._check_choices(turn)
        if turn.template and not turn.messages:
            raise InvalidArgument("template is for messages; a prompt is fed as it is")
        template = get_template(turn.template or ("chat" if turn.messages else "raw"))
        prompt = await self.prompts.build(turn, template)
        built = await self.states.prefixes.build(prompt.head)
        request = self._request(prompt, template, {}, turn, built.state, built.consumed)
        async for event in self._generate(request, deadline, n=turn.n, earlier=built.prefilled):
            yield self._ended(event, 0, cached=built.cached) if isinstance(event, _Done) else event

    async def _ephemeral(self, turn: TurnInput, deadline: float | None) -> AsyncIterator[TurnEvent]:
        self._check_choices(turn)
        meta = await self._meta(turn)
        template = get_template(meta.template)
        prompt = await self.prompts.build(turn, template, meta)
        with self.telemetry.span("state.load", self.telemetry.state_load, session_id=meta.session_id):
            loaded = await self.states.load(meta, system_prompt=prompt.system)
        request = self._request(prompt, template, meta.sampling, turn, loaded.state, loaded.consumed)
        async for event in self._generate(request, deadline, n=turn.n, earlier=loaded.prefilled):
            yield self._ended(event, meta.version, meta.state_tokens, cached=loaded.cached) \
                if isinstance(event, _Done) else event

    async def _session_turn(self, turn: TurnInput, deadline: float | None) -> AsyncIterator[TurnEvent]:
        # Two store round trips per turn: the lease with the session's meta (and, unless the local cache should
        # hit, its state bytes) in one, the commit with the lease's release in the other. A turn the session
        # already committed under this turn id (its worker died before sending turn_end) gets the stored result
        # from the first round trip instead, before any version check: it is never applied twice.
        if turn.n > 1:
            raise InvalidArgument("n > 1 needs a turn that commits nothing (stateless, or ephemeral on a session)")
        sid = turn.session_id
        digest = input_digest(turn) if turn.turn_id else ""
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
            template = get_template(meta.template)
            prompt = await self.prompts.build(turn, template, meta)
            with self.telemetry.span("state.load", self.telemetry.state_load, session_id=meta.session_id):
                loaded = await self.states.load(meta, data, system_prompt=prompt.system)
            del data  # the decoded state is all that is needed now
            request = self._request(prompt, template, meta.sampling, turn, loaded.state, loaded.consumed)
            async for event in self._generate(request, deadline, renewal, earlier=loaded.prefilled):
                if not isinstance(event, _Done):
                    if isinstance(event, TextDelta):
                        texts.append(event.text)
                        token_ids.extend(event.token_ids)
                    elif isinstance(event, TurnStarted):
                        input_tokens = event.prompt_tokens
                    yield event
                    continue
                if event.finished.state is None:  # cancelled: the stored state stays as it was
                    ended = self._ended(event, meta.version, meta.state_tokens, cached=loaded.cached)
                    released = True
                    await self._release(lease, renewal)
                else:
                    # Commit and release in one call, and only then turn_end: a client that sends its next turn
                    # the moment it sees this one end must find the session free. (If the commit fails, the
                    # finally below releases the lease: a no-op when the commit script already did.)
                    ended = self._ended(event, 0, cached=loaded.cached)
                    record = turn_record(turn, digest, ended, "".join(texts), token_ids, input_tokens) \
                        if turn.turn_id else None
                    version = await self._commit(lease, meta, event.finished, record)
                    released = True
                    self._stop_renewal(renewal)
                    if self.config.fault_after_commit == "exit":  # TEST ONLY (WorkerSettings.fault_after_commit)
                        log.error("fault injection: exiting after the commit of %s version %d, before turn_end",
                                  sid, version)
                        os._exit(1)
                    ended = replace(ended, state_version=version)
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
                      replayed=True, cached_tokens=record.cached_tokens),
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
        if turn.template and turn.template != meta.template:
            raise InvalidArgument(f"session {meta.session_id} uses the {meta.template!r} template, not "
                                  f"{turn.template!r}")
        if meta.model != self.config.model_id:
            raise InvalidArgument(f"session {meta.session_id} runs on model {meta.model!r}, "
                                  f"this worker serves {self.config.model_id!r}")
        if turn.expected_version is not None and turn.expected_version != meta.version:
            raise VersionConflict(f"session {meta.session_id} is at version {meta.version}, "
                                  f"not {turn.expected_version}")
        return meta

    async def _prefill(self, tokens: list[int], base: State | None, consumed: int = 0) -> Finished:
        """Feeds `tokens` onto `base` through the engine and returns the finished turn (its state)."""
        done = None
        async for event in self._generate(TurnRequest(tokens, state=base, tokens_consumed=consumed,
                                                      prefill_only=True), None):
            done = event
        assert isinstance(done, _Done) and done.finished.state is not None
        return done.finished

    def _check_choices(self, turn: TurnInput) -> None:
        if turn.n > self.config.max_choices:
            raise InvalidArgument(f"n is {turn.n}; the limit is {self.config.max_choices}")

    def _request(self, prompt: Prompt, template: ChatTemplate, session_sampling: Mapping[str, Any],
                 turn: TurnInput, state: State | None, consumed: int) -> TurnRequest:
        sampling = merge_sampling(self.config.default_sampling, session_sampling, turn.sampling)
        params = sampling_params(sampling, template.stop_strings if prompt.chat else ())
        epilogue = self.tokenizer.encode(template.epilogue()) if prompt.chat and template.epilogue() else []
        return TurnRequest(prompt.tokens, params, state=state, tokens_consumed=consumed, epilogue=epilogue)

    async def _fork(self, request: TurnRequest, n: int) -> list[TurnRequest]:
        """n requests from one: the prompt but its last token prefilled once, each choice feeding that token onto
        its own copy of the state (seed + i when a seed is set)."""
        tokens, state, consumed = list(request.tokens), request.state, request.tokens_consumed
        if len(tokens) > 1:
            finished = await self._prefill(tokens[:-1], state, consumed)
            state, consumed = finished.state, finished.tokens_consumed
        seed = request.params.seed
        return [replace(request, tokens=tokens[-1:], state=None if state is None else state.clone(),
                        tokens_consumed=consumed,
                        params=request.params if seed is None else replace(request.params, seed=(seed + i) % 2 ** 64))
                for i in range(n)]

    async def _generate(
        self, request: TurnRequest, deadline: float | None, renewal: asyncio.Task[None] | None = None, *,
        n: int = 1, earlier: int = 0,
    ) -> AsyncIterator[TurnEvent | _Done]:
        """Submits to the engine (n choices: n turns) and relays their events; cancels the engine turns if the
        caller goes away. `earlier`: prompt tokens fed before this request (its state's segments), reported in
        the turn's prompt_tokens."""
        if deadline is not None:  # the engine drops the turn unrun if the deadline passes while it waits
            request = replace(request, deadline=deadline)
        prompt_tokens = earlier + len(request.tokens)
        requests = await self._fork(request, n) if n > 1 else [request]
        turns: list[Turn] = []
        getters: dict[int, asyncio.Future[Any]] = {}
        try:
            for r in requests:
                turns.append(self.engine.submit(r))
            if not request.prefill_only:
                for choice in range(len(turns)):
                    yield TurnStarted(prompt_tokens, self.config.worker_id, choice=choice)
            live = list(range(len(turns)))
            while live:
                choice, event = await next_event(turns, live, getters, deadline, renewal)
                if isinstance(event, Finished):
                    # The engine thread's phases, as child spans of the current one.
                    self.telemetry.phase_spans(event.timings, decoded=event.generated_tokens > 0)
                    live.remove(choice)
                    earlier_here = prompt_tokens - len(requests[choice].tokens)
                    yield _Done(choice, replace(event, prompt_tokens=event.prompt_tokens + earlier_here))
                else:
                    yield text_delta(event, choice, self.tokenizer)
        finally:
            for getter in getters.values():
                getter.cancel()
            for turn in turns:
                turn.cancel()  # no-op once finished; otherwise frees the batch slot within one step

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
                                                          record_ttl_ms=self.config.turn_result_ttl_ms,
                                                          keep_versions=meta.keep_versions)
            span.set_attribute("rwkv.state_bytes", len(data))
            span.set_attribute("rwkv.state_version", version)
        self.telemetry.state_size.record(len(data))
        self.cache.put(meta.session_id, version, host, finished.tokens_consumed)
        return version

    @staticmethod
    def _ended(done: _Done, version: int, state_tokens: int | None = None, *, cached: int = 0) -> TurnEnded:
        """The domain event; state_tokens overrides the engine's count when the state was not kept."""
        f = done.finished
        return TurnEnded(
            f.reason, f.prompt_tokens, f.generated_tokens, f.tokens_consumed if state_tokens is None else state_tokens,
            version, f.stop_string, f.stop_token_id, cached_tokens=cached, choice=done.choice,
        )
