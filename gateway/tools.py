"""Tool calling for chat completions, in the one tool-call text format of RWKV models (common/tools.py).

- The request's tools are offered in the system prompt (offer_tools), and unless tool_choice is "none" the reply
  is constrained by a grammar built from them (tool_grammar -> Sampling.response_format lark_grammar): a forced
  call ("required", a named function) can only be a well-formed call whose arguments follow the tool's schema.
- Assistant messages with tool_calls are rendered as the calls' text; tool messages (matched to their call by
  tool_call_id) as Tool-role results, so a conversation comes back to the model exactly as it wrote it.
- A reply is parsed back into OpenAI tool_calls (finish_reason "tool_calls"); text that is not a call stays text.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from common.errors import InvalidArgument
from common.tools import assistant_text as tool_text
from common.tools import (
    offer_tools,
    parse_tool_calls,
    parse_tools,
    render_tool_result,
    tool_grammar,
)
from gateway.errors import bad_request
from gateway.render import Message
from gateway.schemas import ChatCompletionRequest, ChatMessageIn, message_text


def _invalid(exc: InvalidArgument, param: str) -> Exception:
    return bad_request(exc.message, param)


def constraint(body: ChatCompletionRequest) -> dict[str, str] | None:
    """The grammar that the reply must follow (None: free text), from tools + tool_choice."""
    if not body.tools:
        if body.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    try:
        return tool_grammar(parse_tools(body.tools), body.tool_choice, parallel=body.parallel_tool_calls is not False)
    except InvalidArgument as exc:
        raise _invalid(exc, "tool_choice" if "tool_choice" in exc.message else "tools") from None


def offered(body: ChatCompletionRequest, messages: list[Message]) -> list[Message]:
    """The messages with the tools offered at the end of the (first) system message."""
    if not body.tools:
        return messages
    try:
        tools = parse_tools(body.tools)
    except InvalidArgument as exc:
        raise _invalid(exc, "tools") from None
    if messages and messages[0].role == "system":
        return [Message("system", offer_tools(messages[0].content, tools)), *messages[1:]]
    return [Message("system", offer_tools("", tools)), *messages]


def assistant_text(m: ChatMessageIn, i: int, names: dict[str, str]) -> str:
    """An assistant message's text with its tool calls written as the model writes them; records their names
    by call id (for the tool messages that answer them)."""
    calls = (m.model_extra or {}).get("tool_calls") or []
    text = message_text(m.content, f"messages[{i}].content")
    if not calls:
        return text
    parsed = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request('a tool call is {"id", "type": "function", "function": {"name", "arguments"}}',
                              f"messages[{i}].tool_calls[{j}]")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise bad_request("a tool call's arguments must be JSON text", f"messages[{i}].tool_calls[{j}]") from None
        names[str(call.get("id", ""))] = fn["name"]
        parsed.append({"name": fn["name"], "arguments": arguments})
    return tool_text(text, parsed)


def tool_result(m: ChatMessageIn, i: int, names: dict[str, str]) -> Message:
    """A tool message as the Tool-role result of the call it answers."""
    name = names.get(m.tool_call_id or "")
    if name is None:
        raise bad_request(f"tool_call_id {m.tool_call_id!r} answers no tool call of an earlier assistant message",
                          f"messages[{i}].tool_call_id")
    return Message("tool", render_tool_result(name, message_text(m.content, f"messages[{i}].content")))


def reply(text: str) -> tuple[dict[str, Any], bool]:
    """The assistant message of a reply (tool_calls when it made calls) and whether it did."""
    parsed = parse_tool_calls(text)
    if not parsed.calls:
        return {"role": "assistant", "content": text, "refusal": None}, False
    calls = [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
              "function": {"name": c.name, "arguments": c.arguments_json}} for c in parsed.calls]
    return {"role": "assistant", "content": parsed.content or None, "refusal": None, "tool_calls": calls}, True
