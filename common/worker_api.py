"""The worker API's domain types (a turn's input, its events, the worker's load) and their protobuf conversion.

Imports neither torch nor redis, so the servicer and the front can use it. Sampling travels as a dict of the
fields that were set (`{"temperature": 0.0}`), which keeps "unset" distinct from 0 through every layer:
request override over session default over worker default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.errors import InvalidArgument
from common.templates import Message, template_from_enum
from rwkv_serve.contract import StopReason, sampling_from_pb
from rwkv_serve.v1 import common_pb2, worker_pb2


def merge_sampling(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers override earlier ones field by field (defaults first, per-turn overrides last)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return merged


class InputKind(str, Enum):
    """How a turn's text becomes tokens."""

    CHAT = "chat"  # a user message, formatted with the session's template
    RAW = "raw"  # fed as is


_KIND_FROM_PB = {worker_pb2.INPUT_KIND_CHAT: InputKind.CHAT, worker_pb2.INPUT_KIND_RAW: InputKind.RAW}


@dataclass(frozen=True)
class TurnInput:
    """One turn for a worker: where its state comes from, its input, and how to sample."""

    session_id: str = ""  # '' = stateless (model's initial state, nothing stored)
    kind: InputKind = InputKind.RAW
    text: str = ""
    token_ids: tuple[int, ...] = ()
    sampling: Mapping[str, Any] = field(default_factory=dict)  # overrides over the session's defaults
    expected_version: int | None = None
    commit: bool = True  # False: read the session's state, never write it
    model: str = ""  # the model the caller expects ('' = whatever this worker serves)
    turn_id: str = ""
    return_token_ids: bool = False
    messages: tuple[Message, ...] = ()  # instead of text: a conversation rendered with the template
    template: str = ""  # for messages without a session ('' = chat); a session's turn uses the session's
    n: int = 1  # choices sampled from the one prefilled prompt (more than 1 only when nothing is committed)

    @classmethod
    def from_pb(cls, pb: worker_pb2.RunTurnRequest) -> TurnInput:
        if pb.kind not in _KIND_FROM_PB:
            raise InvalidArgument("RunTurnRequest.kind must be INPUT_KIND_CHAT or INPUT_KIND_RAW")
        if pb.messages and (pb.text or pb.token_ids):
            raise InvalidArgument("give either text (and token ids) or messages, not both")
        if pb.n < 0:
            raise InvalidArgument(f"n must be at least 1 (0 means 1), not {pb.n}")
        return cls(
            session_id=pb.session_id,
            kind=_KIND_FROM_PB[pb.kind],
            text=pb.text,
            token_ids=tuple(pb.token_ids),
            sampling=sampling_from_pb(pb.sampling),
            expected_version=pb.expected_state_version if pb.HasField("expected_state_version") else None,
            commit=pb.commit if pb.HasField("commit") else True,
            model=pb.model,
            turn_id=pb.turn_id,
            return_token_ids=pb.return_token_ids,
            messages=messages_from_pb(pb.messages),
            template=template_from_enum(pb.template) if pb.template else "",
            n=max(pb.n, 1),
        )


def messages_from_pb(pbs: Sequence[common_pb2.ChatMessage]) -> tuple[Message, ...]:
    return tuple(Message(m.role, m.content, m.name) for m in pbs)


def messages_to_pb(messages: Sequence[Message]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m.role, content=m.content, name=m.name) for m in messages]


@dataclass(frozen=True)
class TurnStarted:
    """The turn was admitted: its input size and where it runs."""

    prompt_tokens: int
    worker_id: str
    replayed: bool = False  # the turn was already committed: what follows is its stored result (not on the wire)
    choice: int = 0  # which of the request's n choices (ChatEvent.choice)

    def to_pb(self, turn_id: str = "", return_token_ids: bool = False) -> common_pb2.ChatEvent:
        return common_pb2.ChatEvent(
            turn_id=turn_id, choice=self.choice,
            turn_start=common_pb2.TurnStart(prompt_tokens=self.prompt_tokens, worker_id=self.worker_id),
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and its most likely alternatives (token id, logprob, bytes)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float, bytes], ...] = ()
    token_bytes: bytes = b""  # the token's bytes in the vocabulary (a token may be part of a UTF-8 character)


@dataclass(frozen=True)
class TextDelta:
    """New text (UTF-8 complete, possibly empty) and the tokens that produced it."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    choice: int = 0

    def to_pb(self, turn_id: str = "", return_token_ids: bool = False) -> common_pb2.ChatEvent:
        delta = common_pb2.TextDelta(text=self.text)
        if return_token_ids:
            delta.token_ids.extend(self.token_ids)
        for lp in self.logprobs:
            delta.logprobs.append(common_pb2.TokenLogprob(
                token_id=lp.token_id, logprob=lp.logprob, token_bytes=lp.token_bytes,
                top=[common_pb2.TopLogprob(token_id=t, logprob=p, token_bytes=b) for t, p, b in lp.top],
            ))
        return common_pb2.ChatEvent(turn_id=turn_id, delta=delta, choice=self.choice)


@dataclass(frozen=True)
class TurnEnded:
    """The last event of a turn."""

    reason: StopReason
    prompt_tokens: int
    generated_tokens: int
    state_tokens: int
    state_version: int  # after the turn (unchanged when cancelled or not committed; 0 when stateless)
    stop_string: str = ""
    stop_token_id: int = -1
    replayed: bool = False  # the committed result of an earlier attempt under the same turn id, sent again
    cached_tokens: int = 0  # of prompt_tokens, those a cached state covered (not prefilled by this turn)
    choice: int = 0

    def to_pb(self, turn_id: str = "", return_token_ids: bool = False) -> common_pb2.ChatEvent:
        return common_pb2.ChatEvent(turn_id=turn_id, choice=self.choice, turn_end=common_pb2.TurnEnd(
            stop_reason=int(self.reason),
            usage=common_pb2.Usage(prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                                   state_tokens=self.state_tokens, cached_tokens=self.cached_tokens),
            state_version=self.state_version,
            stop_string=self.stop_string,
            stop_token_id=max(self.stop_token_id, 0),
            replayed=self.replayed,
        ))


TurnEvent = TurnStarted | TextDelta | TurnEnded


@dataclass(frozen=True)
class PreparedState:
    """An uploaded preset state as a worker checked it: the state record to store, and what it says."""

    record: bytes
    fingerprint: str  # hex of the model fingerprint the record is stamped with
    tokens: int  # tokens the state has consumed

    def to_pb(self) -> worker_pb2.PrepareStateResponse:
        return worker_pb2.PrepareStateResponse(state_record=self.record, fingerprint=self.fingerprint,
                                               tokens=self.tokens)

    @classmethod
    def from_pb(cls, pb: worker_pb2.PrepareStateResponse) -> PreparedState:
        return cls(pb.state_record, pb.fingerprint, pb.tokens)


@dataclass(frozen=True)
class ModelDescription:
    """The model a worker serves."""

    id: str
    n_layer: int = 0
    n_embd: int = 0
    n_head: int = 0
    vocab_size: int = 0
    state_bytes: int = 0
    fingerprint: str = ""  # hex
    random_init: bool = False
    presets: tuple[str, ...] = ()
    head_size: int = 64

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            id=self.id, n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, vocab_size=self.vocab_size,
            state_bytes=self.state_bytes, fingerprint=self.fingerprint, random_init=self.random_init,
            presets=list(self.presets), head_size=self.head_size,
        )


# The registry record's fields beside worker_id/address/model: the load ones, then the model's (flat JSON).
_LOAD_FIELDS = ("capacity", "active", "queued", "max_queued", "serving")
_MODEL_FIELDS = ("fingerprint", "random_init", "n_layer", "n_embd", "n_head", "head_size", "vocab_size",
                 "state_bytes")


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's identity and load: its GetLoad answer, and the registry record it writes and the front reads."""

    worker_id: str
    address: str
    model: ModelDescription
    capacity: int = 1
    active: int = 0
    queued: int = 0
    max_queued: int = 0
    serving: bool = True

    @property
    def load(self) -> float:
        """Occupancy of the batch and queue, for least-loaded placement."""
        return (self.active + self.queued) / max(self.capacity, 1)

    @property
    def saturated(self) -> bool:
        """Its queue was full at the last heartbeat (it would likely refuse a turn)."""
        return self.max_queued > 0 and self.queued >= self.max_queued

    def to_pb(self) -> worker_pb2.LoadInfo:
        return worker_pb2.LoadInfo(
            worker_id=self.worker_id, address=self.address, model=self.model.to_pb(), capacity=self.capacity,
            active=self.active, queued=self.queued, max_queued=self.max_queued, serving=self.serving,
        )

    def to_record(self) -> dict[str, Any]:
        """The JSON-able registry record."""
        record: dict[str, Any] = {"worker_id": self.worker_id, "address": self.address, "model": self.model.id}
        record.update({name: getattr(self, name) for name in _LOAD_FIELDS})
        record.update({name: getattr(self.model, name) for name in _MODEL_FIELDS})
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> WorkerLoad:
        """Reads what to_record wrote; ValueError when a field is missing or of the wrong type."""
        try:
            r = record
            model = ModelDescription(
                id=str(r["model"]), n_layer=int(r["n_layer"]), n_embd=int(r["n_embd"]), n_head=int(r["n_head"]),
                vocab_size=int(r["vocab_size"]), state_bytes=int(r["state_bytes"]), fingerprint=str(r["fingerprint"]),
                random_init=bool(r["random_init"]), head_size=int(r["head_size"]))
            return cls(worker_id=str(r["worker_id"]), address=str(r["address"]), model=model,
                       capacity=int(r["capacity"]), active=int(r["active"]), queued=int(r["queued"]),
                       max_queued=int(r["max_queued"]), serving=bool(r["serving"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable worker registry record ({exc!r})") from None
