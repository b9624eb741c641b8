"""The blocking client: `RWKVClient` and its bidirectional `ChatStream`."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


class ChatStream:
    """One open Chat stream: `send()` turns, iterate the typed events, `cancel()` the running turn.

    Turns sent on one stream run one after another; iterate (or call `until_turn_end()`) to receive their
    events. Use it as a context manager, or call `close()`, to end the stream (a running turn is cancelled).
    A stream does not retry: a failed turn ends it with the error; send the turn again, with the same turn_id, on
    a new stream (chat() and say() do that for you)."""

    def __init__(self, stub: api_pb2_grpc.RwkvServiceStub, metadata: Sequence[tuple[str, str]],
                 session_id: str | None, timeout: float | None) -> None:
        self.session_id = session_id
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._decoder = _core.EventDecoder()
        self._call = stub.Chat(self._requests(), metadata=metadata, timeout=timeout)
        self._sending = True

    def _requests(self) -> Iterator[Any]:
        while (request := self._outbox.get()) is not None:
            yield request

    def send(self, text: str = "", *, session_id: str | None = None, turn_id: str | None = None,
             expected_state_version: int | None = None, return_token_ids: bool = False,
             messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None, **sampling: Any) -> str:
        """Queues a user turn (its text, or whole `messages`: see RWKVClient.chat); returns its turn id."""
        sid = session_id or self.session_id
        if not sid:
            raise ValueError("send() needs a session_id (none was given to the stream)")
        if not self._sending:
            raise RuntimeError("the stream is closed for sending")
        request = _core.chat_turn(sid, text, turn_id=turn_id, expected_state_version=expected_state_version,
                                  return_token_ids=return_token_ids, messages=messages, **sampling)
        self._outbox.put(request)
        return request.turn.turn_id

    def cancel(self, turn_id: str = "") -> None:
        """Cancels the running turn (or the named one); its TurnResult arrives with stop_reason CANCELLED."""
        if self._sending:
            self._outbox.put(_core.chat_cancel(turn_id))

    def done_sending(self) -> None:
        """Half-closes the stream: the turns already sent still run, then the server ends the stream."""
        if self._sending:
            self._sending = False
            self._outbox.put(None)

    def close(self) -> None:
        """Ends the stream now, cancelling a running turn."""
        self.done_sending()
        self._call.cancel()

    def __iter__(self) -> Iterator[ChatEvent]:
        return self

    def __next__(self) -> ChatEvent:
        try:
            pb = next(self._call)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return self._decoder.decode(pb)

    def until_turn_end(self) -> Iterator[ChatEvent]:
        """The events up to and including the next TurnResult."""
        for event in self:
            yield event
            if isinstance(event, TurnResult):
                return

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RWKVClient:
    """Blocking client of the rwkv-serve public API (sessions, chat, generate, models, tokenize)."""

    def __init__(self, target: str, api_key: str | None = None, *, timeout: float | None = 30.0,
                 channel: grpc.Channel | None = None, options: Sequence[tuple[str, Any]] | None = None,
                 credentials: grpc.ChannelCredentials | None = None, tracer_provider: Any = None,
                 max_turn_retries: int = 3, retry_backoff_s: float = 0.2) -> None:
        """`target` is "host:port"; `timeout` is the deadline of unary calls (streams take their own);
        `credentials` turn on TLS (`client.tls_credentials(ca)`); with an OpenTelemetry `tracer_provider` each
        call gets a client span and sends its trace context (W3C traceparent) to the server.

        A turn (chat, say, generate, complete) that fails with a retryable error (UNAVAILABLE, e.g. its worker
        died; RESOURCE_EXHAUSTED with a retry hint) is sent again with the same turn id, up to `max_turn_retries`
        times (0: never), after the server's retry hint or else `retry_backoff_s`, doubling. A turn the server had
        committed is answered from that commit, never applied twice (see chat() for what a stream yields)."""
        self.max_turn_retries, self.retry_backoff_s = _core.retry_settings(max_turn_retries, retry_backoff_s)
        self._channel = channel or _core.sync_channel(target, options, credentials, tracer_provider)
        self._stub = api_pb2_grpc.RwkvServiceStub(self._channel)
        self._metadata = _core.call_metadata(api_key)
        self.timeout = timeout

    def _unary(self, op: _core.Unary[T], timeout: float | None) -> T:
        try:
            response = getattr(self._stub, op.method)(op.request, metadata=self._metadata,
                                                      timeout=timeout if timeout is not None else self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return op.decode(response)

    # ---- sessions ------------------------------------------------------------------------------------------

    def create_session(self, model: str, *, template: ChatTemplate | str | None = None, system_prompt: str = "",
                       preset: str = "", ttl: timedelta | float | None = None,
                       metadata: Mapping[str, str] | None = None, timeout: float | None = None,
                       keep_versions: int = 0, **sampling: Any) -> Session:
        """Creates a session; sampling keyword arguments become its defaults. `keep_versions`: earlier state
        versions kept besides the current one, for fork_session(state_version=...) (each costs a state's bytes)."""
        return self._unary(_core.create_session(model, template=template, system_prompt=system_prompt,
                                                preset=preset, ttl=ttl, metadata=metadata,
                                                keep_versions=keep_versions, **sampling), timeout)

    def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        """A session's metadata (SessionNotFoundError when unknown)."""
        return self._unary(_core.get_session(session_id), timeout)

    def list_sessions(self, *, model: str = "", page_size: int = 0, page_token: str = "",
                      timeout: float | None = None) -> SessionPage:
        """One page of the caller's sessions."""
        return self._unary(_core.list_sessions(model=model, page_size=page_size, page_token=page_token), timeout)

    def iter_sessions(self, *, model: str = "", page_size: int = 0) -> Iterator[Session]:
        """All of the caller's sessions, page after page."""
        token = ""
        while True:
            page = self.list_sessions(model=model, page_size=page_size, page_token=token)
            yield from page.sessions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:
        """Deletes a session and its state."""
        self._unary(_core.delete_session(session_id), timeout)

    def fork_session(self, session_id: str, *, ttl: timedelta | float | None = None,
                     metadata: Mapping[str, str] | None = None, expected_state_version: int | None = None,
                     timeout: float | None = None, state_version: int | None = None, **sampling: Any) -> Session:
        """A new session starting from a copy of this one's current state, or of an earlier version it keeps
        (`state_version`; see create_session(keep_versions=...)): a branch. A version no longer kept is
        SessionNotFoundError, saying it was evicted."""
        return self._unary(_core.fork_session(session_id, ttl=ttl, metadata=metadata,
                                              expected_state_version=expected_state_version,
                                              state_version=state_version, **sampling), timeout)

    # ---- models ----------------------------------------------------------------------------------------------

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models with at least one live worker."""
        return self._unary(_core.list_models(), timeout)

    def tokenize(self, model: str, text: str, *, timeout: float | None = None) -> list[int]:
        """Token ids of `text` under the model's tokenizer."""
        return self._unary(_core.tokenize(model, text), timeout)

    # ---- presets ---------------------------------------------------------------------------------------------

    def register_preset(self, model: str, name: str, path_or_bytes: str | Path | bytes, description: str = "", *,
                        replace: bool = False, timeout: float | None = None) -> Preset:
        """Registers a state-tuned file (a time_state .pth, as RWKV-LM / RWKV-PEFT save it) or a state record as
        preset `name` of the model; sessions then start from it with `create_session(model, preset=name)`.
        Needs a preset admin API key (PermissionDeniedError otherwise); a taken name is PresetExistsError unless
        `replace`; a state of another model is ForeignStateError."""
        op = _core.register_preset(model, name, path_or_bytes, description=description, replace=replace)
        return self._unary(op, timeout)

    def list_presets(self, model: str, *, timeout: float | None = None) -> list[Preset]:
        """The model's presets, by name."""
        return self._unary(_core.list_presets(model), timeout)

    def delete_preset(self, model: str, name: str, *, timeout: float | None = None) -> None:
        """Deletes a preset (PresetNotFoundError when there is none; a preset admin API key is needed)."""
        self._unary(_core.delete_preset(model, name), timeout)

    # ---- turns -----------------------------------------------------------------------------------------------

    def chat_stream(self, session_id: str | None = None, *, timeout: float | None = None) -> ChatStream:
        """Opens a bidirectional Chat stream (bound to `session_id` when given)."""
        return ChatStream(self._stub, self._metadata, session_id, timeout)

    def chat(self, session_id: str, text: str = "", *, timeout: float | None = None,
             expected_state_version: int | None = None, return_token_ids: bool = False, turn_id: str | None = None,
             messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
             **sampling: Any) -> Iterator[str | TextDelta | TurnResult]:
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
        yield from self._chat(session_id, text, True, timeout=timeout, expected_state_version=expected_state_version,
                              return_token_ids=return_token_ids, turn_id=turn_id, messages=messages, **sampling)

    def _chat(self, session_id: str, text: str, streaming: bool, *, timeout: float | None = None,
              expected_state_version: int | None = None, return_token_ids: bool = False, turn_id: str | None = None,
              messages: Any = None, **sampling: Any) -> Iterator[str | TextDelta | TurnResult]:
        request = _core.chat_turn(session_id, text, turn_id=turn_id, expected_state_version=expected_state_version,
                                  return_token_ids=return_token_ids, messages=messages,
                                  **sampling)  # checked once, sent each attempt

        def attempt(deadline: float | None) -> Iterator[ChatEvent]:
            stream = self.chat_stream(session_id, timeout=deadline)
            try:
                stream.send(text, turn_id=request.turn.turn_id, expected_state_version=expected_state_version,
                            return_token_ids=return_token_ids, messages=messages, **sampling)
                yield from stream.until_turn_end()
                stream.done_sending()
                for _ in stream:  # the server ends the stream once the half-close arrives
                    pass
            finally:
                stream.close()

        yield from self._retrying(attempt, timeout, streaming)

    def _retrying(self, attempt: Callable[[float | None], Iterator[ChatEvent]], timeout: float | None,
                  streaming: bool, choices: int = 1) -> Iterator[Any]:
        """Runs attempts of one turn until one ends it, as _core.TurnRetry decides."""
        retry = _core.TurnRetry(self.max_turn_retries, self.retry_backoff_s, timeout, streaming=streaming,
                                choices=choices)
        while True:
            with contextlib.closing(attempt(retry.timeout())) as events:
                try:
                    for event in events:
                        yield from retry.items(event)
                    return
                except RWKVError as error:
                    wait = retry.delay(error)  # raises when the turn may not be retried
            time.sleep(wait)

    def say(self, session_id: str, text: str = "", **kwargs: Any) -> TurnResult:
        """Runs one turn and returns its TurnResult (whole text) without streaming; retried as chat() is, except
        that the text of a failed attempt does not matter (nothing of it was shown)."""
        return _last(self._chat(session_id, text, False, **kwargs))

    def generate(self, prompt: str = "", *, model: str = "", session_id: str = "", ephemeral: bool = False,
                 expected_state_version: int | None = None, return_token_ids: bool = False,
                 timeout: float | None = None, turn_id: str | None = None,
                 messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
                 template: ChatTemplate | str | None = None, n: int = 1,
                 **sampling: Any) -> Iterator[str | TurnResult | TextDelta]:
        """Completes a raw prompt, or `messages` (a stateless chat completion with `template`, default chat: the
        shared prefix-state cache makes a resent conversation prefill only its new part, usage.cached_tokens says
        how much was found): yields text deltas, then the TurnResult. Stateless unless `session_id`. Retried as
        chat() is. With n > 1 (stateless or ephemeral): n choices sampled from the one prefilled prompt (seeds seed,
        seed+1, ... when a seed is given); then it yields TextDelta events and each choice's TurnResult, each with
        its `.choice`, and is not retried once anything was yielded."""
        yield from self._generate(prompt, True, model=model, session_id=session_id, ephemeral=ephemeral,
                                  expected_state_version=expected_state_version, return_token_ids=return_token_ids,
                                  timeout=timeout, turn_id=turn_id, messages=messages, template=template, n=n,
                                  **sampling)

    def _generate(self, prompt: str, streaming: bool, *, timeout: float | None = None,
                  **kwargs: Any) -> Iterator[Any]:
        request = _core.generate(prompt, **kwargs)

        def attempt(deadline: float | None) -> Iterator[ChatEvent]:
            call = self._stub.Generate(request, metadata=self._metadata, timeout=deadline)
            decoder = _core.EventDecoder()
            try:
                for pb in call:
                    yield decoder.decode(pb)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            finally:
                call.cancel()

        yield from self._retrying(attempt, timeout, streaming, max(request.n, 1))

    def complete(self, prompt: str = "", **kwargs: Any) -> TurnResult | Choices:
        """Like generate(), returning only the TurnResult (whole text); with n > 1 the Choices (every choice's
        TurnResult)."""
        if kwargs.get("n", 1) > 1:
            return _core.choices_of(list(self._generate(prompt, False, **kwargs)))
        return _last(self._generate(prompt, False, **kwargs))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RWKVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last(items: Iterator[str | TurnResult]) -> TurnResult:
    result = None
    for item in items:
        result = item
    if not isinstance(result, TurnResult):
        raise RuntimeError("the stream ended without a turn result")
    return result
