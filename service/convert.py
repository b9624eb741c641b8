"""Protobuf <-> domain conversion for the front: templates, sessions, validation of what CreateSession stores.

Session default sampling is stored as the worker reads it (common.worker_api.sampling_from_pb: the set fields as a
dict); the worker merges a turn's overrides over it, so the front passes overrides through untouched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.errors import InvalidArgument
from common.templates import TEMPLATE_NAMES, Message, check_messages
from rwkv_serve.contract import sampling_to_pb
from rwkv_serve.v1 import api_pb2, common_pb2

if TYPE_CHECKING:
    from common.store import PresetInfo, SessionMeta

# The enum of the public API <-> the template names common/templates.py and the store use (TEMPLATE_NAMES).
_TEMPLATE_ENUMS = {name: number for number, name in TEMPLATE_NAMES.items()}

METADATA_MAX_ENTRIES = 64
METADATA_MAX_KEY = 128
METADATA_MAX_VALUE = 1024


@dataclass(frozen=True)
class InputLimits:
    """Sizes the front accepts (from FrontSettings), checked before anything is stored or routed. Text is
    measured in UTF-8 bytes: a token covers at least one byte, so max_text_bytes also bounds what the worker must
    tokenize before it can apply its exact token limit."""

    max_text_bytes: int = 256 * 1024
    metadata_max_entries: int = METADATA_MAX_ENTRIES
    metadata_max_key_bytes: int = METADATA_MAX_KEY
    metadata_max_value_bytes: int = METADATA_MAX_VALUE
    max_messages: int = 256  # messages in one turn's input
    max_choices: int = 16  # n of one Generate
    max_keep_versions: int = 16  # CreateSession.keep_versions

    def check_input(self, what: str, text: str, messages: Sequence[common_pb2.ChatMessage], *, session: bool) -> None:
        """A turn's input: its text (`what`: "text" or "prompt") or its messages, not both, within the limits."""
        self.check_text(what, text)
        if messages:
            if text:
                raise InvalidArgument(f"give either {what} or messages, not both")
            self.check_messages(messages, session=session)

    def check_messages(self, messages: Sequence[common_pb2.ChatMessage], *, session: bool) -> None:
        """A turn's messages: the conversation rules (common/templates.py check_messages), and their text, all
        together, within max_text_bytes."""
        check_messages([Message(m.role, m.content, m.name) for m in messages], max_messages=self.max_messages,
                       session=session)
        size = sum(len(m.content.encode("utf-8", "surrogatepass")) + len(m.name) for m in messages)
        if size > self.max_text_bytes:
            raise InvalidArgument(f"the messages' text is {size} bytes; the limit is {self.max_text_bytes}")

    def check_text(self, what: str, text: str) -> str:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_text_bytes:
            raise InvalidArgument(f"{what} is {size} bytes; the limit is {self.max_text_bytes}")
        return text


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


def check_metadata(metadata: dict[str, str], limits: InputLimits = InputLimits()) -> dict[str, str]:
    if len(metadata) > limits.metadata_max_entries:
        raise InvalidArgument(f"at most {limits.metadata_max_entries} metadata entries")
    for key, value in metadata.items():
        key_bytes, value_bytes = len(key.encode("utf-8", "surrogatepass")), len(value.encode("utf-8", "surrogatepass"))
        if not key or key_bytes > limits.metadata_max_key_bytes or value_bytes > limits.metadata_max_value_bytes:
            raise InvalidArgument(f"metadata keys are 1-{limits.metadata_max_key_bytes} and values "
                                  f"0-{limits.metadata_max_value_bytes} bytes")
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
        keep_versions=meta.keep_versions,
    )
    pb.created_at.FromMilliseconds(meta.created_ms)
    pb.updated_at.FromMilliseconds(meta.updated_ms)
    pb.ttl.FromMilliseconds(meta.ttl_ms)
    return pb


def preset_to_pb(info: PresetInfo) -> api_pb2.Preset:
    pb = api_pb2.Preset(model=info.model, name=info.name, description=info.description, tokens=info.tokens,
                        state_bytes=info.state_bytes)
    if info.created_ms:
        pb.created.FromMilliseconds(info.created_ms)
    return pb
