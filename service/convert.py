"""Protobuf <-> domain conversion for the front: templates, sessions, validation of what CreateSession stores.

Session default sampling is stored as the worker reads it (worker.turns.sampling_from_pb: the set fields as a
dict); the worker merges a turn's overrides over it, so the front passes overrides through untouched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rwkv_serve.v1 import api_pb2, common_pb2
from worker.errors import InvalidArgument
from worker.turns import sampling_to_pb

if TYPE_CHECKING:
    from worker.store import SessionMeta

# The enum of the public API <-> the template names worker/templates.py and the store use.
TEMPLATE_NAMES: dict[int, str] = {
    common_pb2.CHAT_TEMPLATE_CHAT: "chat",
    common_pb2.CHAT_TEMPLATE_ONE_STATE: "one-state",
    common_pb2.CHAT_TEMPLATE_RAW: "raw",
}
_TEMPLATE_ENUMS = {name: number for number, name in TEMPLATE_NAMES.items()}

METADATA_MAX_ENTRIES = 64
METADATA_MAX_KEY = 128
METADATA_MAX_VALUE = 1024


def template_name(template: int) -> str:
    """ChatTemplate enum -> stored name (unspecified means chat)."""
    if template == common_pb2.CHAT_TEMPLATE_UNSPECIFIED:
        return "chat"
    try:
        return TEMPLATE_NAMES[template]
    except KeyError:
        raise InvalidArgument(f"unknown chat template {template}") from None


def template_enum(name: str) -> int:
    return _TEMPLATE_ENUMS.get(name, common_pb2.CHAT_TEMPLATE_UNSPECIFIED)


def check_sampling(pb: common_pb2.Sampling) -> None:
    """Rejects values that no worker would accept, so bad session defaults fail at creation, not at turn 1."""
    if pb.HasField("temperature") and not pb.temperature >= 0:
        raise InvalidArgument("temperature must be >= 0")
    if pb.HasField("top_p") and not 0 < pb.top_p <= 1:
        raise InvalidArgument("top_p must be in (0, 1]")
    if pb.HasField("top_k") and pb.top_k < 0:
        raise InvalidArgument("top_k must be >= 0")
    if pb.HasField("max_tokens") and pb.max_tokens < 1:
        raise InvalidArgument("max_tokens must be >= 1")
    if pb.HasField("logprobs") and pb.logprobs < 0:
        raise InvalidArgument("logprobs must be >= 0")
    if pb.HasField("penalty_decay") and not 0 <= pb.penalty_decay <= 1:
        raise InvalidArgument("penalty_decay must be in [0, 1]")


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > METADATA_MAX_ENTRIES:
        raise InvalidArgument(f"at most {METADATA_MAX_ENTRIES} metadata entries")
    for key, value in metadata.items():
        if not key or len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE:
            raise InvalidArgument(f"metadata keys are 1-{METADATA_MAX_KEY} and values 0-{METADATA_MAX_VALUE} chars")
    return dict(metadata)


def session_to_pb(meta: SessionMeta) -> api_pb2.Session:
    pb = api_pb2.Session(
        session_id=meta.session_id,
        model=meta.model,
        template=template_enum(meta.template),
        default_sampling=sampling_to_pb(meta.sampling),
        state_version=meta.version,
        state_tokens=meta.state_tokens,
        turns=meta.turns,
        system_prompt=meta.system_prompt,
        preset=meta.preset,
        forked_from=meta.forked_from,
        metadata=meta.metadata,
    )
    pb.created_at.FromMilliseconds(meta.created_ms)
    pb.updated_at.FromMilliseconds(meta.updated_ms)
    pb.ttl.FromMilliseconds(meta.ttl_ms)
    return pb
