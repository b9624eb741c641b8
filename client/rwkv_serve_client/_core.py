"""The SDK's logic shared by the sync and asyncio clients: request building, response and event decoding.

Each public operation is described once here as a `Unary` (stub method, request, decoder); `sync.py` and `aio.py`
only execute these descriptions with their flavour of channel and turn gRPC errors into typed exceptions. A turn's
retries are decided here too (`TurnRetry`): the twins only sleep and start the next attempt.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import duration_pb2

from rwkv_serve import contract
from rwkv_serve.contract import API_KEY_HEADER
from rwkv_serve.v1 import api_pb2, common_pb2
from rwkv_serve_client.errors import (
    QuotaExceededError,
    ResourceExhaustedError,
    RWKVError,
    SessionBusyError,
    UnavailableError,
)
from rwkv_serve_client.types import (
    ChatEvent,
    ChatTemplate,
    Choices,
    Message,
    ModelInfo,
    Preset,
    Session,
    SessionPage,
    StopReason,
    TextDelta,
    TokenLogprob,
    TurnResult,
    TurnStarted,
    Usage,
)

T = TypeVar("T")


def sampling_to_pb(sampling: Mapping[str, Any] | None) -> common_pb2.Sampling | None:
    """Sampling keyword arguments -> Sampling message, or None (field left unset) when none were given.

    rwkv_serve.contract.sampling_to_pb does the work: TypeError for unknown names, before anything is sent."""
    return contract.sampling_to_pb(sampling) if sampling else None


@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary call: which stub method, with which request, and how to decode its response."""

    method: str
    request: Any
    decode: Callable[[Any], T]


def tls_credentials(ca: str | Path | bytes | None = None, cert: str | Path | bytes | None = None,
                    key: str | Path | bytes | None = None) -> grpc.ChannelCredentials:
    """TLS credentials for a client: the CA that signed the server's certificate (None: the system's roots),
    plus a client certificate and key where the server requires one. Paths or PEM bytes."""
    def read(value: str | Path | bytes | None) -> bytes | None:
        return value if value is None or isinstance(value, bytes) else Path(value).read_bytes()

    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))


def sync_channel(target: str, options: Sequence[tuple[str, Any]] | None, credentials: grpc.ChannelCredentials | None,
                 tracer_provider: Any = None) -> grpc.Channel:
    """A blocking channel: TLS when credentials are given; with a tracer provider every call gets a client span
    and carries its W3C trace context (traceparent) in the metadata."""
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    if tracer_provider is None:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(tracer_provider=tracer_provider))


def aio_channel(target: str, options: Sequence[tuple[str, Any]] | None, credentials: grpc.ChannelCredentials | None,
                tracer_provider: Any = None) -> grpc.aio.Channel:
    """The asyncio twin of sync_channel."""
    interceptors = None
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        interceptors = aio_client_interceptors(tracer_provider=tracer_provider)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying the API key, if any."""
    return ((API_KEY_HEADER, f"Bearer {api_key}"),) if api_key else ()


def _duration(value: timedelta | float | int | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=float(value)))
    return d


def new_turn_id() -> str:
    """A short random turn id: a cancel names the turn it means with it, and a retry sends it again, so that a
    turn the server already committed is answered from the commit instead of running twice."""
    return uuid.uuid4().hex[:12]


# ---- sessions --------------------------------------------------------------------------------------------------


def create_session(model: str, *, template: ChatTemplate | str | None = None, system_prompt: str = "",
                   preset: str = "", ttl: timedelta | float | None = None, metadata: Mapping[str, str] | None = None,
                   keep_versions: int = 0, **sampling: Any) -> Unary[Session]:
    request = api_pb2.CreateSessionRequest(
        model=model, template=int(ChatTemplate.parse(template)), system_prompt=system_prompt, preset=preset,
        default_sampling=sampling_to_pb(sampling), ttl=_duration(ttl), metadata=dict(metadata or {}),
        keep_versions=keep_versions)
    return Unary("CreateSession", request, Session.from_pb)


def get_session(session_id: str) -> Unary[Session]:
    return Unary("GetSession", api_pb2.GetSessionRequest(session_id=session_id), Session.from_pb)


def list_sessions(*, model: str = "", page_size: int = 0, page_token: str = "") -> Unary[SessionPage]:
    request = api_pb2.ListSessionsRequest(model=model, page_size=page_size, page_token=page_token)
    return Unary("ListSessions", request,
                 lambda pb: SessionPage([Session.from_pb(s) for s in pb.sessions], pb.next_page_token))


def delete_session(session_id: str) -> Unary[None]:
    return Unary("DeleteSession", api_pb2.DeleteSessionRequest(session_id=session_id), lambda _: None)


def fork_session(session_id: str, *, ttl: timedelta | float | None = None, metadata: Mapping[str, str] | None = None,
                 expected_state_version: int | None = None, state_version: int | None = None,
                 **sampling: Any) -> Unary[Session]:
    request = api_pb2.ForkSessionRequest(
        session_id=session_id, ttl=_duration(ttl), metadata=dict(metadata or {}),
        default_sampling=sampling_to_pb(sampling), expected_state_version=expected_state_version,
        state_version=state_version)
    return Unary("ForkSession", request, Session.from_pb)


def list_models() -> Unary[list[ModelInfo]]:
    return Unary("ListModels", api_pb2.ListModelsRequest(), lambda pb: [ModelInfo.from_pb(m) for m in pb.models])


def tokenize(model: str, text: str) -> Unary[list[int]]:
    return Unary("Tokenize", api_pb2.TokenizeRequest(model=model, text=text), lambda pb: list(pb.token_ids))


# ---- presets ---------------------------------------------------------------------------------------------------

# The first bytes of a state record (worker/state.py MAGIC; copied so that the SDK needs no torch, and
# tests/test_preset_api.py keeps the two equal). Anything else is sent as a time_state .pth.
STATE_RECORD_MAGIC = b"RWKV5ST\x00"


def register_preset(model: str, name: str, path_or_bytes: str | Path | bytes, *, description: str = "",
                    replace: bool = False) -> Unary[Preset]:
    """A RegisterPreset call: a file path or the bytes themselves, either a time_state .pth (RWKV-LM / RWKV-PEFT
    state tuning) or a state record (told apart by the record's magic bytes)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    source = "state_record" if data.startswith(STATE_RECORD_MAGIC) else "time_state_pth"
    request = api_pb2.RegisterPresetRequest(model=model, name=name, description=description, replace=replace,
                                            **{source: data})
    return Unary("RegisterPreset", request, Preset.from_pb)


def list_presets(model: str) -> Unary[list[Preset]]:
    return Unary("ListPresets", api_pb2.ListPresetsRequest(model=model),
                 lambda pb: [Preset.from_pb(p) for p in pb.presets])


def delete_preset(model: str, name: str) -> Unary[None]:
    return Unary("DeletePreset", api_pb2.DeletePresetRequest(model=model, name=name), lambda _: None)


# ---- turns -----------------------------------------------------------------------------------------------------


def messages_to_pb(messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None
                   ) -> list[common_pb2.ChatMessage]:
    """`messages=` of chat/generate: Message objects, dicts with role/content(/name), or (role, content) pairs."""
    return [Message.parse(m).to_pb() for m in messages or ()]


def chat_turn(session_id: str, text: str = "", *, turn_id: str | None = None,
              expected_state_version: int | None = None, return_token_ids: bool = False,
              messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
              **sampling: Any) -> api_pb2.ChatRequest:
    """A ChatRequest that runs one user turn, its text or whole `messages` (a fresh turn_id when none is given)."""
    if text and messages:
        raise ValueError("give either text or messages, not both")
    turn = api_pb2.ChatTurn(
        session_id=session_id, text=text, sampling=sampling_to_pb(sampling), turn_id=turn_id or new_turn_id(),
        expected_state_version=expected_state_version, return_token_ids=return_token_ids,
        messages=messages_to_pb(messages))
    return api_pb2.ChatRequest(turn=turn)


def chat_cancel(turn_id: str = "") -> api_pb2.ChatRequest:
    """A ChatRequest that cancels the running turn (or the named one)."""
    return api_pb2.ChatRequest(cancel=api_pb2.ChatCancel(turn_id=turn_id))


def generate(prompt: str = "", *, model: str = "", session_id: str = "", ephemeral: bool = False,
             expected_state_version: int | None = None, return_token_ids: bool = False, turn_id: str | None = None,
             messages: Sequence[Message | Mapping[str, str] | tuple[str, str]] | None = None,
             template: ChatTemplate | str | None = None, n: int = 1, **sampling: Any) -> api_pb2.GenerateRequest:
    """A GenerateRequest (stateless when session_id is empty): a raw prompt, or `messages` rendered with
    `template` (or the session's); n > 1 choices from one prefilled prompt."""
    if not model and not session_id:
        raise ValueError("generate() needs a model or a session_id")
    if prompt and messages:
        raise ValueError("give either prompt or messages, not both")
    if n < 1:
        raise ValueError("n must be at least 1")
    return api_pb2.GenerateRequest(
        model=model, prompt=prompt, sampling=sampling_to_pb(sampling), session_id=session_id, ephemeral=ephemeral,
        expected_state_version=expected_state_version, return_token_ids=return_token_ids,
        turn_id=turn_id or new_turn_id(), messages=messages_to_pb(messages),
        template=int(ChatTemplate.parse(template)), n=n if n > 1 else 0)


def chat_item(event: ChatEvent) -> str | TurnResult | None:
    """What chat()/generate() yield for an event: the delta's text, the TurnResult, or nothing."""
    if isinstance(event, TextDelta):
        return event.text or None
    if isinstance(event, TurnResult):
        return event
    return None


def choices_of(items: list[Any]) -> Choices:
    """complete(n > 1)'s answer from what generate yielded (each choice's TurnResult, in choice order)."""
    results = sorted((i for i in items if isinstance(i, TurnResult)), key=lambda r: r.choice)
    if not results:
        raise RuntimeError("the stream ended without a turn result")
    return Choices(results[0].turn_id, results)


class EventDecoder:
    """Turns ChatEvent messages into typed events; a turn's TurnResult carries the whole text of the turn."""

    def __init__(self) -> None:
        self._text: dict[tuple[str, int], list[str]] = {}  # by (turn id, choice)
        self._tokens: dict[tuple[str, int], list[int]] = {}
        self._worker: dict[tuple[str, int], str] = {}
        self._logprobs: dict[tuple[str, int], list[TokenLogprob]] = {}

    def decode(self, pb: common_pb2.ChatEvent) -> ChatEvent:
        turn_id, choice = pb.turn_id, pb.choice
        key = (turn_id, choice)
        kind = pb.WhichOneof("event")
        if kind == "turn_start":
            self._worker[key] = pb.turn_start.worker_id
            return TurnStarted(turn_id, pb.turn_start.prompt_tokens, pb.turn_start.worker_id, choice)
        if kind == "delta":
            d = pb.delta
            self._text.setdefault(key, []).append(d.text)
            self._tokens.setdefault(key, []).extend(d.token_ids)
            logprobs = [TokenLogprob.from_pb(lp) for lp in d.logprobs]
            if logprobs:
                self._logprobs.setdefault(key, []).extend(logprobs)
            return TextDelta(turn_id, d.text, list(d.token_ids), logprobs, choice)
        if kind == "turn_end":
            e = pb.turn_end
            return TurnResult(
                turn_id=turn_id,
                text="".join(self._text.pop(key, [])),
                stop_reason=StopReason(e.stop_reason),
                usage=Usage(e.usage.prompt_tokens, e.usage.generated_tokens, e.usage.state_tokens,
                            e.usage.cached_tokens),
                state_version=e.state_version,
                stop_string=e.stop_string,
                stop_token_id=e.stop_token_id,
                worker_id=self._worker.pop(key, ""),
                token_ids=self._tokens.pop(key, []),
                replayed=e.replayed,
                choice=choice,
                logprobs=self._logprobs.pop(key, []),
            )
        raise ValueError(f"event without a body in turn {turn_id!r}")


# ---- retries ---------------------------------------------------------------------------------------------------

MAX_RETRY_WAIT_S = 30.0  # a server hint longer than this (a token window) is not waited out: the error is raised


def retry_settings(max_turn_retries: int, retry_backoff_s: float) -> tuple[int, float]:
    """The clients' turn-retry settings, checked (both twins take them as constructor arguments)."""
    if max_turn_retries < 0 or retry_backoff_s < 0:
        raise ValueError("max_turn_retries and retry_backoff_s must not be negative")
    return max_turn_retries, retry_backoff_s


def retryable(error: RWKVError, *, retrying: bool) -> bool:
    """Whether a turn that failed with `error` may be sent again (with the same turn id).

    UNAVAILABLE (no worker, a worker lost under the turn, Redis unreachable, a commit not confirmed by the
    replicas) and RESOURCE_EXHAUSTED with a retry hint (overload) are; a tenant's quota, DEADLINE_EXCEEDED and
    every other error are not. SessionBusy is, on a retry only: the failed attempt's lease may not be gone yet."""
    if isinstance(error, QuotaExceededError):
        return False
    if isinstance(error, ResourceExhaustedError):
        return error.retry_after_s is not None
    if isinstance(error, UnavailableError):
        return True
    return retrying and isinstance(error, SessionBusyError)


class TurnRetry:
    """One turn's attempts: what of each attempt's events the caller gets, and whether (and when) to try again.

    Every attempt sends the same request, turn id included, so a turn that the server committed before its
    answer was lost comes back as the committed result (TurnEnd.replayed) instead of running again. `streaming`:
    the caller sees the text deltas as they come; then a retry after text was already yielded must repeat that
    text (a replay, or a rerun that produces the same text, e.g. greedy): only the rest is yielded, and a retry
    whose text differs is closed (cancelling it) and the original error is raised. Without `streaming` (say,
    complete) only the TurnResult matters, and any retryable failure is retried."""

    def __init__(self, max_retries: int, backoff_s: float, timeout: float | None, *, streaming: bool,
                 choices: int = 1) -> None:
        self.choices = choices  # > 1: the caller gets TextDelta events (with .choice) and each choice's TurnResult
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.streaming = streaming
        self.retries = 0
        self.done = False  # the TurnResult went to the caller: nothing to retry after that
        self._seen: list[str] = []  # text yielded to the caller so far
        self._pending = ""  # during a retry: yielded text the retry has not repeated yet
        self._error: RWKVError | None = None  # the failure the current attempt retries
        self._gave_up: RWKVError | None = None
        self._logprobs = False  # the turn's deltas carry logprobs: they go to the caller as TextDelta events

    def timeout(self) -> float | None:
        """The deadline of the next attempt's call: what is left of the turn's timeout."""
        return None if self.deadline is None else max(0.001, self.deadline - time.monotonic())

    def items(self, event: ChatEvent) -> list[str | TurnResult]:
        """What the caller gets for one event of the current attempt (chat_item, minus text it already has).

        With several choices, or logprobs asked for, the caller gets TextDelta events and nothing is compared: once
        anything went to the caller the turn is not retried."""
        if self.choices > 1:
            if isinstance(event, TextDelta) and (event.text or event.logprobs) and self.streaming \
                    or isinstance(event, TurnResult):
                self.done = True
                return [event]
            return []
        if isinstance(event, TextDelta):
            if not self.streaming:
                return []
            if event.logprobs or self._logprobs:
                # Logprobs were asked for: the caller gets the TextDelta events (with their logprobs, those whose
                # text is still held back too), and, as with several choices, no retry once one went out.
                self._logprobs = self.done = True
                return [event] if event.text or event.logprobs else []
            if not event.text:
                return []
            text = event.text
            if self._pending:
                common = min(len(text), len(self._pending))
                if text[:common] != self._pending[:common]:
                    raise self._give_up("its text differs from the text already received")
                self._pending, text = self._pending[common:], text[common:]
            if not text:
                return []
            self._seen.append(text)
            return [text]
        if isinstance(event, TurnResult):
            if self._pending:
                raise self._give_up("its text is shorter than the text already received")
            self.done = True
            return [event]
        return []

    def _give_up(self, why: str) -> RWKVError:
        error = self._gave_up = self._error or UnavailableError("the turn failed")
        error.message = f"{error.message} (retried with the same turn id, but {why}: retry cancelled)"
        return error

    def delay(self, error: RWKVError) -> float:
        """Seconds to wait before the next attempt after `error`; raises `error` when the turn may not be retried
        (not retryable, out of retries, no time left, a hint over MAX_RETRY_WAIT_S, or the turn already ended)."""
        if error is self._gave_up or self.done or self.retries >= self.max_retries \
                or not retryable(error, retrying=self.retries > 0):
            raise error
        wait = error.retry_after_s if error.retry_after_s is not None else self.backoff_s * 2 ** self.retries
        if wait > MAX_RETRY_WAIT_S or (self.deadline is not None and time.monotonic() + wait >= self.deadline):
            raise error
        self.retries += 1
        self._error = error
        self._pending = "".join(self._seen)  # every attempt starts the turn's text from its beginning
        return max(0.0, wait)
