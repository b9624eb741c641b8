"""OpenAI messages -> the messages the front runs (api.proto ChatMessage): roles normalised, text extracted,
limits checked. The front's workers render them with the sessions' own chat templates (common/templates.py), so
one conversation gives the same tokens through the gateway as through gRPC sessions."""

from __future__ import annotations

from gateway.errors import bad_request, unsupported
from gateway.schemas import ChatMessageIn, message_text
from rwkv_serve_client import Message  # one message as the front takes it (the SDK's messages= take these as they are)

__all__ = ["Message", "normalise"]


def normalise(messages: list[ChatMessageIn], max_messages: int) -> list[Message]:
    """The messages with "developer" read as "system", assistant tool calls and tool results in the tool-call
    text format (gateway/tools.py); 400 for what cannot be run (audio, non-text parts, a tool message that
    answers no call)."""
    from gateway.tools import assistant_text, tool_result  # (tools builds on Message)

    if len(messages) > max_messages:
        raise bad_request(f"at most {max_messages} messages are allowed, got {len(messages)}", "messages")
    out = []
    names: dict[str, str] = {}  # tool call id -> the function it called
    for i, m in enumerate(messages):
        extra = m.model_extra or {}
        for key in ("function_call", "audio"):
            if extra.get(key):
                raise unsupported(f"messages[{i}].{key}", "use tools / tool_calls; there is no audio")
        if m.role == "tool":
            out.append(tool_result(m, i, names))
        elif m.role == "assistant":
            out.append(Message("assistant", assistant_text(m, i, names)))
        else:
            role = "system" if m.role == "developer" else m.role
            out.append(Message(role, message_text(m.content, f"messages[{i}].content")))
    if out[-1].role not in ("user", "tool"):
        raise bad_request(f"the last message must be the user's or a tool result (the reply follows it), not "
                          f"{out[-1].role!r}", "messages")
    return out
