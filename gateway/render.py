"""OpenAI messages -> the messages the front runs (api.proto ChatMessage): roles normalised, text extracted,
limits checked. The front's workers render them with the sessions' own chat templates (common/templates.py), so
one conversation gives the same tokens through the gateway as through gRPC sessions."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import bad_request, unsupported
from gateway.schemas import ChatMessageIn, message_text


@dataclass(frozen=True)
class Message:
    """One message as the front takes it."""

    role: str  # system, user, assistant (tool once tools exist)
    content: str

    def wire(self) -> dict[str, str]:
        """The SDK's form (messages= of chat / generate)."""
        return {"role": self.role, "content": self.content}


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
        if m.role == "tool":
            raise unsupported(f"messages[{i}].role", "tool messages need tools, which this server does not have")
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role, message_text(m.content, f"messages[{i}].content")))
    if out[-1].role != "user":
        raise bad_request(f"the last message must be the user's (the reply follows it), not {out[-1].role!r}",
                          "messages")
    return out
