"""The tool-call text format (common/tools.py): rendering and parsing agree, tool definitions are checked, and the
grammar built from tools + tool_choice makes a random-init model at temperature 1 write only valid calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from common.errors import InvalidArgument
from common.tools import (
    ParsedReply,
    Tool,
    ToolCall,
    parse_tool_calls,
    parse_tools,
    render_tool_calls,
    render_tool_result,
    tool_grammar,
    tools_prompt,
)
from worker.engine import Delta, Engine, Finished, StopReason, TurnRequest
from worker.sampler import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "unit"], "additionalProperties": False}}}
TICKET = {"type": "function", "function": {
    "name": "open_ticket",
    "parameters": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "urgent": {"type": "boolean"},
        "labels": {"type": "array", "items": {"enum": ["bug", "ops"]}, "maxItems": 2},
    }, "required": ["code", "urgent", "labels"], "additionalProperties": False}}}
TOOLS = [WEATHER, TICKET]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_render_and_parse_agree() -> None:
    calls = [ToolCall("get_weather", {"city": "Paris", "unit": "celsius"}), ToolCall("open_ticket", {"code": "ABC-12"})]
    text = render_tool_calls(calls)
    assert text == ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>\n'
                    '<tool_call>{"name":"open_ticket","arguments":{"code":"ABC-12"}}</tool_call>')
    assert parse_tool_calls(text + "\n\n") == ParsedReply("", tuple(calls))
    # OpenAI-shaped calls (arguments as JSON text) render the same.
    assert render_tool_calls([{"name": "open_ticket", "arguments": '{"code": "ABC-12"}'}]) == text.split("\n")[1]
    assert calls[0].arguments_json == '{"city":"Paris","unit":"celsius"}'


def test_parse_keeps_text_and_malformed_blocks() -> None:
    reply = 'Let me check. <tool_call>{"name":"get_weather","arguments":{"city":"Lima"}}</tool_call> and ' \
            '<tool_call>{not json}</tool_call> <tool_call>{"arguments":{}}</tool_call>'
    parsed = parse_tool_calls(reply)
    assert parsed.calls == (ToolCall("get_weather", {"city": "Lima"}),)
    assert parsed.content == 'Let me check.  and <tool_call>{not json}</tool_call> <tool_call>{"arguments":{}}' \
                             '</tool_call>'
    assert parse_tool_calls("Just text.\n\n") == ParsedReply("Just text.")
    assert parse_tool_calls('<tool_call>{"name":"f","arguments":"{\\"a\\": 1}"}</tool_call>').calls == \
        (ToolCall("f", {"a": 1}),)


def test_tool_results_and_the_tools_prompt() -> None:
    assert render_tool_result("get_weather", '{"temp": 21}') == '{"name":"get_weather","content":{"temp":21}}'
    assert render_tool_result("get_weather", "sunny") == '{"name":"get_weather","content":"sunny"}'
    prompt = tools_prompt(parse_tools(TOOLS))
    assert "<tool_call>" in prompt and prompt.count("\n") == 1 + len(TOOLS)
    assert json.loads(prompt.splitlines()[2])["name"] == "get_weather"


@pytest.mark.parametrize("tools, message", [
    ([{"type": "retrieval"}], "must be 'function'"),
    ([{"type": "function", "function": {"name": "bad name"}}], "name must be"),
    ([WEATHER, WEATHER], "used twice"),
    ([{"name": "f", "parameters": [1]}], "parameters must be"),
])
def test_bad_tool_definitions(tools, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_tools(tools)


def test_tool_choice_forms() -> None:
    assert tool_grammar(TOOLS, "none") is None
    assert parse_tools([{"name": "f"}]) == [Tool("f")]
    with pytest.raises(InvalidArgument, match="not among the tools"):
        tool_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidArgument, match="tool_choice must be"):
        tool_grammar(TOOLS, "sometimes")
    with pytest.raises(InvalidArgument, match="at least one tool"):
        tool_grammar([], "required")
    named = tool_grammar(TOOLS, {"type": "function", "function": {"name": "open_ticket"}})["lark_grammar"]
    assert "open_ticket" in named and "get_weather" not in named


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer):
    return Engine(tiny_model, tokenizer, max_batch=8)


def accepts(engine, fmt: dict, text: str) -> bool:
    """Whether the compiled grammar takes `text` whole (its greedy tokens), ending complete or accepting."""
    constraint = engine.constraints.compile(fmt)
    ids = engine.constraints.lltokenizer.tokenize_str(text)
    return constraint.matcher.validate_tokens(ids) == len(ids) and (
        constraint.matcher.consume_tokens(ids) and constraint.matcher.is_accepting())


def test_the_grammar_takes_exactly_the_rendered_format(engine) -> None:
    call = render_tool_calls([ToolCall("get_weather", {"city": "Tokyo", "unit": "celsius"})])
    two = render_tool_calls([ToolCall("get_weather", {"city": "Lima", "unit": "celsius", "days": 2}),
                             ToolCall("open_ticket", {"code": "ABC-12", "urgent": True, "labels": []})])
    required, auto = tool_grammar(TOOLS, "required"), tool_grammar(TOOLS, "auto")
    single = tool_grammar(TOOLS, "required", parallel=False)
    assert accepts(engine, required, call) and accepts(engine, required, two)
    assert accepts(engine, required, call + "\n\n")
    assert accepts(engine, single, call) and not accepts(engine, single, two)
    assert accepts(engine, auto, call) and accepts(engine, auto, "It is sunny.\n\n")
    assert not accepts(engine, required, "It is sunny.")
    bad_args = render_tool_calls([ToolCall("get_weather", {"city": "Oslo", "unit": "celsius"})])
    spaced = call.replace('{"name":', '{"name": ')
    assert not accepts(engine, required, bad_args) and not accepts(engine, required, spaced)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "open_ticket"}}])
def test_forced_calls_from_a_random_model_are_valid(engine, tokenizer, choice) -> None:
    fmt = tool_grammar(TOOLS, choice)
    prompt = tokenizer.encode(f"System: {tools_prompt(parse_tools(TOOLS))}\n\nUser: help\n\nAssistant:")
    turns = [engine.submit(TurnRequest(prompt, SamplingParams(temperature=1.0, seed=s, max_tokens=300,
                                                              response_format=fmt))) for s in range(4)]
    events: dict[int, list] = {}
    while not engine.idle:
        for turn, event in engine.step_sync():
            events.setdefault(turn.id, []).append(event)
    for turn in turns:
        finished = events[turn.id][-1]
        text = "".join(e.text for e in events[turn.id] if isinstance(e, Delta))
        assert isinstance(finished, Finished) and finished.reason is StopReason.CONSTRAINT_COMPLETE, text
        parsed = parse_tool_calls(text)
        assert parsed.calls and parsed.content == "", text
        for call in parsed.calls:
            if isinstance(choice, dict):
                assert call.name == "open_ticket"
            jsonschema.validate(dict(call.arguments), SCHEMAS[call.name])
