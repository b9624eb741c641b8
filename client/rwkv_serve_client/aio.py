"""The asyncio client: `AsyncRWKVClient` and its bidirectional `AsyncChatStream` (same logic as sync.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc

from rwkv_serve.v1 import api_pb2_grpc
from rwkv_serve_client import _core
from rwkv_serve_client.errors import RWKVError, from_rpc_error
from rwkv_serve_client.types import (
    ChatEvent,
    ChatTemplate,
    Choices,
    Message,
    ModelInfo,
    Preset,
    Session,
    SessionPage,
    TextDelta,
    TurnResult,
)

T = TypeVar("T")


class AsyncChatStream:
    """One open Chat stream: `await send()` turns, `async for` the typed events, `await cancel()` a turn.

    A stream does not retry (as ChatStream): chat() and say() do."""

    def __init__(self, stub: api_pb2_grpc.RwkvServiceStub, metadata: Sequence[tuple[str, str]],
                 session_id: str | None, timeout: float | None) -> None:
        self.session_id = session_id
        self._decoder = _core.EventDecoder()
        self._call = stub.Chat(metadata=metadata, timeout=timeout)
        self._sending = True

    async def _write(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def send(self, text: str = "", *, session_id: str | None = None, turn_id: str | None = None,
                   expected_state_version: int | None = None, return_token_ids: bool = False,
                   messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
                   **sampling: Any) -> str:
        """Sends a user turn (its text, or whole `messages`: see RWKVClient.chat); returns its turn id."""
        sid = session_id or self.session_id
        if not sid:
            raise ValueError("send() needs a session_id (none was given to the stream)")
        if not self._sending:
            raise RuntimeError("the stream is closed for sending")
        request = _core.chat_turn(sid, text, turn_id=turn_id, expected_state_version=expected_state_version,
                                  return_token_ids=return_token_ids, messages=messages, **sampling)
        await self._write(request)
        return request.turn.turn_id

    async def cancel(self, turn_id: str = "") -> None:
        """Cancels the running turn (or the named one); its TurnResult arrives with stop_reason CANCELLED."""
        if self._sending:
            await self._write(_core.chat_cancel(turn_id))

    async def done_sending(self) -> None:
        """Half-closes the stream: the turns already sent still run, then the server ends the stream."""
        if self._sending:
            self._sending = False
            try:
                await self._call.done_writing()
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None

    def close(self) -> None:
        """Ends the stream now, cancelling a running turn."""
        self._sending = False
        self._call.cancel()

    def __aiter__(self) -> AsyncIterator[ChatEvent]:
        return self

    async def __anext__(self) -> ChatEvent:
        try:
            pb = await self._call.read()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        if pb is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._decoder.decode(pb)

    async def until_turn_end(self) -> AsyncIterator[ChatEvent]:
        """The events up to and including the next TurnResult."""
        async for event in self:
            yield event
            if isinstance(event, TurnResult):
                return

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncRWKVClient:
    """asyncio client of the rwkv-serve public API; construct it inside the running event loop."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float | None = 30.0,
                 channel: grpc.aio.Channel | None = None, options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None, tracer_provider: Any = None,
                 max_turn_retries: int = 3, retry_backoff_s: float = 0.2) -> None:
        """As RWKVClient: `credentials` for TLS, an OpenTelemetry `tracer_provider` to trace the calls, a turn
        retried up to `max_turn_retries` times with the same turn id (0: never)."""
        self.max_turn_retries, self.retry_backoff_s = _core.retry_settings(max_turn_retries, retry_backoff_s)
        self._channel = channel or _core.aio_channel(target, options, credentials, tracer_provider)
        self._stub = api_pb2_grpc.RwkvServiceStub(self._channel)
        self._metadata = _core.call_metadata(api_key)
        self.timeout = timeout

    async def _unary(self, op: _core.Unary[T], timeout: float | None) -> T:
        try:
            response = await getattr(self._stub, op.method)(
                op.request, metadata=self._metadata, timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return op.decode(response)

    # ---- sessions ------------------------------------------------------------------------------------------

    async def create_session(self, model: str, *, template: ChatTemplate | str | None = None,
                             system_prompt: str = "", preset: str = "", ttl: timedelta | float | None = None,
                             metadata: Mapping[str, str] | None = None, timeout: float | None = None,
                             keep_versions: int = 0, **sampling: Any) -> Session:
        """Creates a session; sampling keyword arguments become its defaults (as RWKVClient.create_session)."""
        return await self._unary(_core.create_session(model, template=template, system_prompt=system_prompt,
                                                      preset=preset, ttl=ttl, metadata=metadata,
                                                      keep_versions=keep_versions, **sampling), timeout)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """A session's metadata (SessionNotFoundError when unknown)."""
        return await self._unary(_core.get_session(session_id), timeout)

    async def list_sessions(self, *, model: str = "", page_size: int = 0, page_token: str = "",
                            timeout: float | None = None) -> SessionPage:
        """One page of the caller's sessions."""
        return await self._unary(_core.list_sessions(model=model, page_size=page_size, page_token=page_token),
                                 timeout)

    async def iter_sessions(self, *, model: str = "", page_size: int = 0) -> AsyncIterator[Session]:
        """All of the caller's sessions, page after page."""
        token = ""
        while True:
            page = await self.list_sessions(model=model, page_size=page_size, page_token=token)
            for session in page.sessions:
                yield session
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        """Deletes a session and its state."""
        await self._unary(_core.delete_session(session_id), timeout)

    async def fork_session(self, session_id: str, *, ttl: timedelta | float | None = None,
                           metadata: Mapping[str, str] | None = None, expected_state_version: int | None = None,
                           timeout: float | None = None, state_version: int | None = None,
                           **sampling: Any) -> Session:
        """A new session from a copy of this one's current state or of a kept earlier `state_version` (as
        RWKVClient.fork_session)."""
        return await self._unary(_core.fork_session(session_id, ttl=ttl, metadata=metadata,
                                                    expected_state_version=expected_state_version,
                                                    state_version=state_version, **sampling), timeout)

    # ---- models ----------------------------------------------------------------------------------------------

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models with at least one live worker."""
        return await self._unary(_core.list_models(), timeout)

    async def tokenize(self, model: str, text: str, *, timeout: float | None = None) -> list[int]:
        """Token ids of `text` under the model's tokenizer."""
        return await self._unary(_core.tokenize(model, text), timeout)

    # ---- presets ---------------------------------------------------------------------------------------------

    async def register_preset(self, model: str, name: str, path_or_bytes: str | Path | bytes, description: str = "", *,
                        replace: bool = False, timeout: float | None = None) -> Preset:
        """Registers a state-tuned file (a time_state .pth, as RWKV-LM / RWKV-PEFT save it) or a state record as
        preset `name` of the model; sessions then start from it with `create_session(model, preset=name)`.
        Needs a preset admin API key (PermissionDeniedError otherwise); a taken name is PresetExistsError unless
        `replace`; a state of another model is ForeignStateError."""
        # (reading a 41 MiB file is no job for the event loop)
        op = await asyncio.to_thread(_core.register_preset, model, name, path_or_bytes, description=description,
                                     replace=replace)
        return await self._unary(op, timeout)

    async def list_presets(self, model: str, *, timeout: float | None = None) -> list[Preset]:
        """The model's presets, by name."""
        return await self._unary(_core.list_presets(model), timeout)

    async def delete_preset(self, model: str, name: str, *, timeout: float | None = None) -> None:
        """Deletes a preset (PresetNotFoundError when there is none; a preset admin API key is needed)."""
        await self._unary(_core.delete_preset(model, name), timeout)

    # ---- turns -----------------------------------------------------------------------------------------------

    def chat_stream(self, session_id: str | None = None, *, timeout: float | None = None) -> AsyncChatStream:
        """Opens a bidirectional Chat stream (bound to `session_id` when given)."""
        return AsyncChatStream(self._stub, self._metadata, session_id, timeout)

    async def chat(self, session_id: str, text: str = "", *, timeout: float | None = None,
             expected_state_version: int | None = None, return_token_ids: bool = False, turn_id: str | None = None,
             messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
             **sampling: Any) -> AsyncIterator[str | TextDelta | TurnResult]:
        """Runs one turn: yields the text deltas as they come (TextDelta events, with their logprobs, when the turn
        asks for logprobs; else str), then the TurnResult. `timeout` covers the whole
        turn, retries included; `turn_id` names it (default: a new random one). Instead of `text`, `messages`
        (Message objects, {"role", "content"} dicts or (role, content) pairs: user, assistant, tool; a system
        message only first, and only before a session's first turn when it has no system prompt) are fed in
        order with the session's template, ending where the reply begins.

        Stopping the iteration early cancels the turn (the session's state is left unchanged). A retryable failure
        is retried with the same turn id (see the constructor): before any text was yielded, silently; after,
        only when the retry's text starts with the text already yielded (the turn's committed result, or a rerun
        that repeats it, e.g. greedy), and then only the rest is yielded; a retry with another text is cancelled
        and the original error raised, as without retries."""
        async for item in self._chat(session_id, text, True, timeout=timeout,
                                     expected_state_version=expected_state_version,
                                     return_token_ids=return_token_ids, turn_id=turn_id, messages=messages, **sampling):
            yield item

    async def _chat(self, session_id: str, text: str, streaming: bool, *, timeout: float | None = None,
              expected_state_version: int | None = None, return_token_ids: bool = False, turn_id: str | None = None,
              messages: Any = None, **sampling: Any) -> AsyncIterator[str | TextDelta | TurnResult]:
        request = _core.chat_turn(session_id, text, turn_id=turn_id, expected_state_version=expected_state_version,
                                  return_token_ids=return_token_ids, messages=messages,
                                  **sampling)  # checked once, sent each attempt

        async def attempt(deadline: float | None) -> AsyncIterator[ChatEvent]:
            stream = self.chat_stream(session_id, timeout=deadline)
            try:
                await stream.send(text, turn_id=request.turn.turn_id, expected_state_version=expected_state_version,
                                  return_token_ids=return_token_ids, messages=messages, **sampling)
                async for event in stream.until_turn_end():
                    yield event
                await stream.done_sending()
                async for _ in stream:  # the server ends the stream once the half-close arrives
                    pass
            finally:
                stream.close()

        async for item in self._retrying(attempt, timeout, streaming):
            yield item

    async def _retrying(self, attempt: Callable[[float | None], AsyncIterator[ChatEvent]], timeout: float | None,
                        streaming: bool, choices: int = 1) -> AsyncIterator[Any]:
        """Runs attempts of one turn until one ends it, as _core.TurnRetry decides."""
        retry = _core.TurnRetry(self.max_turn_retries, self.retry_backoff_s, timeout, streaming=streaming,
                                choices=choices)
        while True:
            async with contextlib.aclosing(attempt(retry.timeout())) as events:
                try:
                    async for event in events:
                        for item in retry.items(event):
                            yield item
                    return
                except RWKVError as error:
                    wait = retry.delay(error)  # raises when the turn may not be retried
            await asyncio.sleep(wait)

    async def say(self, session_id: str, text: str = "", **kwargs: Any) -> TurnResult:
        """Runs one turn and returns its TurnResult (whole text) without streaming; retried as chat() is, except
        that the text of a failed attempt does not matter (nothing of it was shown)."""
        return await _last(self._chat(session_id, text, False, **kwargs))

    async def generate(self, prompt: str = "", *, model: str = "", session_id: str = "", ephemeral: bool = False,
                 expected_state_version: int | None = None, return_token_ids: bool = False,
                 timeout: float | None = None, turn_id: str | None = None,
                 messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
                 template: ChatTemplate | str | None = None, n: int = 1,
                 **sampling: Any) -> AsyncIterator[str | TurnResult | TextDelta]:
        """Completes a raw prompt, or `messages` (a stateless chat completion with `template`, default chat: the
        shared prefix-state cache makes a resent conversation prefill only its new part, usage.cached_tokens says
        how much was found): yields text deltas, then the TurnResult. Stateless unless `session_id`. Retried as
        chat() is. With n > 1 (stateless or ephemeral): n choices sampled from the one prefilled prompt (seeds seed,
        seed+1, ... when a seed is given); then it yields TextDelta events and each choice's TurnResult, each with
        its `.choice`, and is not retried once anything was yielded."""
        async for item in self._generate(prompt, True, model=model, session_id=session_id, ephemeral=ephemeral,
                                         expected_state_version=expected_state_version,
                                         return_token_ids=return_token_ids, timeout=timeout, turn_id=turn_id,
                                         messages=messages, template=template, n=n, **sampling):
            yield item

    async def _generate(self, prompt: str, streaming: bool, *, timeout: float | None = None,
                        **kwargs: Any) -> AsyncIterator[Any]:
        request = _core.generate(prompt, **kwargs)

        async def attempt(deadline: float | None) -> AsyncIterator[ChatEvent]:
            call = self._stub.Generate(request, metadata=self._metadata, timeout=deadline)
            decoder = _core.EventDecoder()
            try:
                async for pb in call:
                    yield decoder.decode(pb)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            finally:
                call.cancel()

        async for item in self._retrying(attempt, timeout, streaming, max(request.n, 1)):
            yield item

    async def complete(self, prompt: str = "", **kwargs: Any) -> TurnResult | Choices:
        """Like generate(), returning only the TurnResult (whole text); with n > 1 the Choices (every choice's
        TurnResult)."""
        if kwargs.get("n", 1) > 1:
            return _core.choices_of([item async for item in self._generate(prompt, False, **kwargs)])
        return await _last(self._generate(prompt, False, **kwargs))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRWKVClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _last(items: AsyncIterator[str | TurnResult]) -> TurnResult:
    result = None
    async for item in items:
        result = item
    if not isinstance(result, TurnResult):
        raise RuntimeError("the stream ended without a turn result")
    return result
