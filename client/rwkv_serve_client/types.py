"""Typed results of the SDK, each with `from_pb` beside it (the only place that reads the wire messages).

`StopReason` is rwkv_serve.contract's (the one the server uses too), re-exported here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from rwkv_serve.contract import StopReason, sampling_from_pb
from rwkv_serve.v1 import api_pb2, common_pb2


class ChatTemplate(enum.IntEnum):
    """How a session formats its user turns (see common.proto)."""

    UNSPECIFIED = common_pb2.CHAT_TEMPLATE_UNSPECIFIED
    CHAT = common_pb2.CHAT_TEMPLATE_CHAT
    ONE_STATE = common_pb2.CHAT_TEMPLATE_ONE_STATE
    RAW = common_pb2.CHAT_TEMPLATE_RAW

    @classmethod
    def parse(cls, value: ChatTemplate | str | int | None) -> ChatTemplate:
        """Accepts an enum member, its name ("chat", "one_state", "raw") or its number."""
        if value is None:
            return cls.UNSPECIFIED
        if isinstance(value, str):
            return cls[value.strip().upper().replace("-", "_")]
        return cls(value)


def _time(ts: Any) -> datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Session:
    """A chat session's metadata."""

    session_id: str
    model: str
    template: ChatTemplate
    default_sampling: dict[str, Any]
    state_version: int
    state_tokens: int
    turns: int
    created_at: datetime | None
    updated_at: datetime | None
    ttl: timedelta | None
    system_prompt: str = ""
    preset: str = ""
    forked_from: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    keep_versions: int = 0  # earlier state versions kept for fork_session(state_version=...)

    @classmethod
    def from_pb(cls, pb: api_pb2.Session) -> Session:
        return cls(
            session_id=pb.session_id,
            model=pb.model,
            template=ChatTemplate(pb.template),
            default_sampling=sampling_from_pb(pb.default_sampling),
            state_version=pb.state_version,
            state_tokens=pb.state_tokens,
            turns=pb.turns,
            created_at=_time(pb.created_at),
            updated_at=_time(pb.updated_at),
            ttl=pb.ttl.ToTimedelta() if pb.HasField("ttl") else None,
            system_prompt=pb.system_prompt,
            preset=pb.preset,
            forked_from=pb.forked_from,
            metadata=dict(pb.metadata),
            keep_versions=pb.keep_versions,
        )


@dataclass(frozen=True)
class Message:
    """One message of a conversation given whole (chat/generate `messages=`): role "system", "user",
    "assistant" or "tool"; `name` for a tool's result. Dicts {"role": ..., "content": ..., "name": ...} work too."""

    role: str
    content: str
    name: str = ""

    @classmethod
    def parse(cls, value: Message | Any) -> Message:
        """A Message, a mapping with role/content(/name), or a (role, content) pair."""
        if isinstance(value, Message):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"role", "content", "name"}
            if unknown:
                raise TypeError(f"unknown message fields {sorted(unknown)}")
            return cls(str(value["role"]), str(value.get("content") or ""), str(value.get("name") or ""))
        role, content = value
        return cls(str(role), str(content))

    def to_pb(self) -> common_pb2.ChatMessage:
        return common_pb2.ChatMessage(role=self.role, content=self.content, name=self.name)


@dataclass(frozen=True)
class SessionPage:
    """One page of ListSessions; pass `next_page_token` to get the next (empty on the last page)."""

    sessions: list[Session]
    next_page_token: str


@dataclass(frozen=True)
class ModelInfo:
    """A model the deployment serves."""

    id: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    state_bytes: int
    fingerprint: str
    random_init: bool
    presets: list[str]
    workers: int
    head_size: int = 64

    @classmethod
    def from_pb(cls, pb: common_pb2.ModelInfo) -> ModelInfo:
        return cls(pb.id, pb.n_layer, pb.n_embd, pb.n_head, pb.vocab_size, pb.state_bytes, pb.fingerprint,
                   pb.random_init, list(pb.presets), pb.workers, pb.head_size or 64)


@dataclass(frozen=True)
class Preset:
    """A model's preset initial state (a state-tuned file registered under a name)."""

    model: str
    name: str
    description: str
    tokens: int  # tokens the state has consumed (0 for a state-tuned file)
    created_at: datetime | None
    state_bytes: int

    @classmethod
    def from_pb(cls, pb: api_pb2.Preset) -> Preset:
        return cls(pb.model, pb.name, pb.description, pb.tokens, _time(pb.created), pb.state_bytes)


@dataclass(frozen=True)
class Usage:
    """Token counts of one turn."""

    prompt_tokens: int
    generated_tokens: int
    state_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those a cached state covered (prefix cache, cached system prompt)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives [(token_id, logprob), ...], with the
    tokens' bytes in the model's vocabulary (a token may be part of a UTF-8 character; b"" from older servers)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    token_bytes: bytes = b""  # this token's (not named `bytes`: that would shadow the type in the annotations)
    top_bytes: list[bytes] = field(default_factory=list)  # those of `top`'s tokens, in its order

    @classmethod
    def from_pb(cls, pb: common_pb2.TokenLogprob) -> TokenLogprob:
        return cls(pb.token_id, pb.logprob, [(t.token_id, t.logprob) for t in pb.top], pb.token_bytes,
                   [t.token_bytes for t in pb.top])


@dataclass(frozen=True)
class TurnStarted:
    """A worker admitted the turn."""

    turn_id: str
    prompt_tokens: int
    worker_id: str
    choice: int = 0  # which of the request's n choices


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text (valid UTF-8), with token ids / logprobs when asked for."""

    turn_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    choice: int = 0


@dataclass(frozen=True)
class TurnResult:
    """The end of a turn: its whole text, why it stopped, token usage and the session's new state version."""

    turn_id: str
    text: str
    stop_reason: StopReason
    usage: Usage
    state_version: int
    stop_string: str = ""
    stop_token_id: int = 0
    worker_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    replayed: bool = False  # the server answered a retried turn_id from its commit (the turn ran once, earlier)
    choice: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the turn's tokens' (when Sampling.logprobs > 0)

    @property
    def cancelled(self) -> bool:
        return self.stop_reason == StopReason.CANCELLED


@dataclass(frozen=True)
class Choices:
    """What complete(..., n=k) returns for k > 1: each choice's TurnResult, in choice order (one prefilled prompt,
    k sampled replies)."""

    turn_id: str
    choices: list[TurnResult]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]

    @property
    def usage(self) -> Usage:
        """The prompt once (it was prefilled once), every choice's generated tokens."""
        first = self.choices[0].usage
        return Usage(first.prompt_tokens, sum(c.usage.generated_tokens for c in self.choices), first.state_tokens,
                     first.cached_tokens)


ChatEvent = Union[TurnStarted, TextDelta, TurnResult]
