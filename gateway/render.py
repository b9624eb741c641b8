"""OpenAI messages -> the conversation the front runs: roles normalised, text extracted, limits checked.

The chat templates are the workers' own (common.templates), so one conversation gives the same text through
the gateway as through gRPC sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import bad_request, unsupported
from gateway.schemas import ChatMessageIn, message_text

try:  # the templates are moving from worker/ to the torch-free core
    from common.templates import ChatTemplate, clean_turn_text, get_template
except ImportError:  # pragma: no cover - until common/templates.py lands
    from worker.templates import ChatTemplate, clean_turn_text, get_template  # type: ignore[no-redef]


@dataclass(frozen=True)
class Message:
    """One message as the front takes it (api.proto ChatMessage)."""

    role: str  # system, user, assistant, tool
    content: str
    name: str = ""


def normalise(messages: list[ChatMessageIn], max_messages: int) -> list[Message]:
    """The messages with "developer" read as "system"; 400 for what cannot be run (tool calls, non-text parts)."""
    if len(messages) > max_messages:
        raise bad_request(f"at most {max_messages} messages are allowed, got {len(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        extra = m.model_extra or {}
        for key in ("tool_calls", "function_call", "audio"):
            if extra.get(key):
                raise unsupported(f"messages[{i}].{key}", "this server has no tools or audio")
        role = "system" if m.role == "developer" else m.role
        if role == "tool":
            raise unsupported(f"messages[{i}].role", "tool messages need tools, which this server does not have")
        out.append(Message(role, message_text(m.content, f"messages[{i}].content"), m.name or ""))
    if out[-1].role == "assistant":
        raise bad_request("the last message must not be the assistant's: the reply continues after a user "
                          "message", "messages")
    return out


def render_prompt(messages: list[Message], template: ChatTemplate) -> str:
    """The whole conversation as one prompt text in the template's format, ending where the reply begins:
    system text first (the template's prefix), then each turn as a session feeds it."""
    parts: list[str] = []
    start = 0
    if messages and messages[0].role == "system":
        parts.append(template.prefix(messages[0].content))
        start = 1
    else:
        parts.append(template.prefix(""))
    reply_gap = template.sep[len(template.sep.rstrip()):]  # what user_turn leaves off after "Assistant:"
    for m in messages[start:]:
        if m.role == "user":
            parts.append(template.user_turn(m.content))
        elif m.role == "assistant":
            parts.append(f"{reply_gap}{clean_turn_text(m.content)}{template.end}")
        else:  # a later system message
            parts.append(f"System{template.sep}{clean_turn_text(m.content)}{template.end}")
    return "".join(parts)


def chat_template(name: str | None) -> ChatTemplate:
    return get_template(name or "chat")
