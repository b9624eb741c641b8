"""Typed results of the SDK, each with `from_pb` beside it (the only place that reads the wire messages)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Union

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


class StopReason(enum.IntEnum):
    """Why a turn ended."""

    UNSPECIFIED = common_pb2.STOP_REASON_UNSPECIFIED
    STOP_TOKEN = common_pb2.STOP_REASON_STOP_TOKEN
    STOP_STRING = common_pb2.STOP_REASON_STOP_STRING
    MAX_TOKENS = common_pb2.STOP_REASON_MAX_TOKENS
    CANCELLED = common_pb2.STOP_REASON_CANCELLED


# Sampling keyword arguments accepted by chat()/generate()/create_session(): name -> kind of value.
SAMPLING_FIELDS: dict[str, str] = {
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "penalty_decay": "float",
    "banned_tokens": "tokens",
    "stop_token_ids": "tokens",
    "stop_strings": "strings",
    "max_tokens": "int",
    "seed": "int",
    "logprobs": "int",
}


def sampling_to_pb(sampling: dict[str, Any] | None) -> common_pb2.Sampling | None:
    """Sampling keyword arguments -> Sampling message (None values are left unset: they inherit)."""
    if not sampling:
        return None
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    pb = common_pb2.Sampling()
    for name, value in sampling.items():
        if value is None:
            continue
        kind = SAMPLING_FIELDS[name]
        if kind == "tokens":
            getattr(pb, name).ids.extend(int(v) for v in value)
        elif kind == "strings":
            getattr(pb, name).values.extend([value] if isinstance(value, str) else [str(v) for v in value])
        else:
            setattr(pb, name, float(value) if kind == "float" else int(value))
    return pb


def sampling_from_pb(pb: common_pb2.Sampling) -> dict[str, Any]:
    """The set fields of a Sampling message as keyword arguments."""
    out: dict[str, Any] = {}
    for name, kind in SAMPLING_FIELDS.items():
        if not pb.HasField(name):
            continue
        value = getattr(pb, name)
        if kind == "tokens":
            out[name] = list(value.ids)
        elif kind == "strings":
            out[name] = list(value.values)
        else:
            out[name] = value
    return out


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
        )


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


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives [(token_id, logprob), ...]."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class TurnStarted:
    """A worker admitted the turn."""

    turn_id: str
    prompt_tokens: int
    worker_id: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text (valid UTF-8), with token ids / logprobs when asked for."""

    turn_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


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

    @property
    def cancelled(self) -> bool:
        return self.stop_reason == StopReason.CANCELLED


ChatEvent = Union[TurnStarted, TextDelta, TurnResult]
