"""Tool calls for RWKV models: the one text format (templates, tuning data, parser, grammar), torch-free.

The format (docs/structured_output.md):
- the tools are offered in the system prompt (`tools_prompt`), one compact JSON definition per line;
- the assistant calls a tool with one line per call, compact JSON with "name" first:
      <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>
  several calls in one reply are separated by "\\n"; the reply (calls or text) ends at the turn's end ("\\n\\n");
- a tool's result comes back as a message of the Tool role, "Tool: {json}\\n\\n" in the chat template, its body
  `{"name":"get_weather","content":...}` (content: the result's JSON value when it is JSON, else the text).

`tool_grammar` builds a Lark grammar (llguidance's dialect, with inline `%json` schemas) from OpenAI-style tool
definitions and a tool_choice, so that constrained decoding (Sampling.response_format lark_grammar) can only
produce well-formed calls whose arguments validate against the tool's parameter schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_SEPARATOR = "\n"  # between the calls of one reply
TOOL_ROLE = "Tool"  # the role name of a tool result in the chat templates
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
# The text branch of tool_choice "auto": a reply that is not a call (it may not start with "<"), ending at the
# turn's end "\n\n" (or wherever the model ends its output); it cannot contain "\n\n", as a chat reply cannot.
_TEXT_TERMINAL = r"/[^<\n]([^\n]|\n[^\n])*(\n\n?)?/"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, description and JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class ToolCall:
    """One call in a reply: the function's name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as compact JSON text (OpenAI's `function.arguments` is a string)."""
        return _compact(self.arguments)


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into its text (calls removed, stripped) and its tool calls, in order."""

    content: str
    calls: tuple[ToolCall, ...] = ()


def parse_tools(tools: Sequence[Mapping[str, Any]]) -> list[Tool]:
    """Tools from OpenAI definitions ({"type": "function", "function": {...}}) or flat {"name", "parameters"};
    InvalidArgument for a malformed one (names unique, 1-64 of [A-Za-z0-9_-], parameters a JSON schema object)."""
    out: list[Tool] = []
    for i, spec in enumerate(tools):
        if not isinstance(spec, Mapping):
            raise InvalidArgument(f"tools[{i}] must be an object")
        if spec.get("type", "function") != "function":
            raise InvalidArgument(f"tools[{i}].type must be 'function', got {spec.get('type')!r}")
        fn = spec.get("function", spec)
        if not isinstance(fn, Mapping):
            raise InvalidArgument(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidArgument(f"tools[{i}] name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if any(t.name == name for t in out):
            raise InvalidArgument(f"tools[{i}]: the name {name!r} is used twice")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise InvalidArgument(f"tools[{i}] ({name}) parameters must be a JSON schema object")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidArgument(f"tools[{i}] ({name}) description must be a string")
        out.append(Tool(name, description, dict(params)))
    return out


def render_tool_calls(calls: Sequence[ToolCall | Mapping[str, Any]]) -> str:
    """An assistant reply that makes these calls, exactly as the grammar has the model write it."""
    lines = []
    for call in calls:
        if isinstance(call, Mapping):
            arguments = call.get("arguments", {})
            call = ToolCall(call["name"], json.loads(arguments) if isinstance(arguments, str) else arguments)
        lines.append(f"{CALL_OPEN}{_compact({'name': call.name, 'arguments': call.arguments})}{CALL_CLOSE}")
    return CALL_SEPARATOR.join(lines)


def render_tool_result(name: str, content: str) -> str:
    """The body of a Tool message carrying a tool's result (the template adds "Tool: " and the turn's end)."""
    try:
        value: Any = json.loads(content)
    except ValueError:
        value = content
    return _compact({"name": name, "content": value})


def assistant_text(content: str, calls: Sequence[ToolCall | Mapping[str, Any]]) -> str:
    """An assistant message's whole text: its words (if any), then its calls as the model writes them."""
    if not calls:
        return content
    rendered = render_tool_calls(calls)
    return f"{content}\n{rendered}" if content.strip() else rendered


def offer_tools(system_prompt: str, tools: Sequence[Tool]) -> str:
    """A system prompt with the tools offered after it (the whole system prompt when there was none)."""
    if not tools:
        return system_prompt
    return f"{system_prompt}\n{tools_prompt(tools)}" if system_prompt.strip() else tools_prompt(tools)


def tools_prompt(tools: Sequence[Tool]) -> str:
    """System prompt text that offers the tools and says how to call them."""
    lines = [f"You can call these tools. To call one, reply with {CALL_OPEN}{{\"name\":...,\"arguments\":{{...}}}}"
             f"{CALL_CLOSE}, one call per line; each result comes back as a {TOOL_ROLE} message.", "Tools:"]
    lines += [_compact({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in tools]
    return "\n".join(lines)


def parse_tool_calls(text: str) -> ParsedReply:
    """Splits a reply into text and calls. A block that is not a call (bad JSON, no name, arguments not an object)
    stays in the text, so nothing the model wrote is lost."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for match in _CALL.finditer(text):
        call = _call_of(match.group(1))
        if call is None:
            continue
        kept.append(text[pos:match.start()])
        calls.append(call)
        pos = match.end()
    kept.append(text[pos:])
    return ParsedReply("".join(kept).strip(), tuple(calls))


def _call_of(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # tolerated: arguments given as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return ToolCall(value["name"], arguments) if isinstance(arguments, dict) else None


def _choice(tool_choice: str | Mapping[str, Any] | None, tools: Sequence[Tool]) -> tuple[str, list[Tool]]:
    """("auto" | "none" | "required", the tools allowed) of an OpenAI tool_choice."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise InvalidArgument(f"tool_choice must be 'auto', 'none', 'required' or a named function, "
                                  f"got {tool_choice!r}")
        return tool_choice, list(tools)
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise InvalidArgument('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    named = [t for t in tools if t.name == name]
    if not named:
        raise InvalidArgument(f"tool_choice names {name!r}, which is not among the tools")
    return "required", named


def tool_grammar(tools: Sequence[Mapping[str, Any] | Tool], tool_choice: str | Mapping[str, Any] | None = "auto",
                 *, parallel: bool = True) -> dict[str, str] | None:
    """The response_format ({"lark_grammar": ...}) that only lets the model write valid calls of `tools`:
    "required" (or a named function): one call or more (exactly one unless `parallel`); "auto": a plain text reply
    or calls; "none": None (no constraint: the reply is text). Each call's arguments follow its parameter schema."""
    parsed = [t if isinstance(t, Tool) else parse_tools([t])[0] for t in tools]
    mode, allowed = _choice(tool_choice, parsed)
    if mode == "none":
        return None
    if not allowed:
        raise InvalidArgument(f"tool_choice {mode!r} needs at least one tool")
    rules = [f'start: {"TEXT | " if mode == "auto" else ""}calls "\\n\\n"?',
             f'calls: call{f" ({json.dumps(CALL_SEPARATOR)} call)*" if parallel else ""}',
             f"call: {json.dumps(CALL_OPEN)} ({' | '.join(f'fn_{i}' for i in range(len(allowed)))}) "
             f"{json.dumps(CALL_CLOSE)}"]
    for i, tool in enumerate(allowed):
        schema = {
            "x-guidance": {"whitespace_flexible": False},  # compact, as render_tool_calls writes it
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        rules.append(f"fn_{i}: %json {_compact(schema)}")
    if mode == "auto":
        rules.append(f"TEXT: {_TEXT_TERMINAL}")
    return {"lark_grammar": "\n".join(rules) + "\n"}
