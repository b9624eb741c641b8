"""Tool calling through the gateway with the official openai SDK (the tool-call format of common/tools.py): a
random-init model at temperature 1, forced to call, writes calls that name the tool with arguments valid
against its schema; the calls and their results go back into the conversation; streamed equals whole."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.test_gateway_support import MODEL, Gateway, start_gateway, start_service

pytestmark = pytest.mark.usefixtures("one_thread")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {  # (closed: a random model writes
    "type": "object", "properties": {}, "additionalProperties": False}}}  # keys forever into an open object)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def gateway(redis_url, tiny_model, tokenizer, one_thread) -> Iterator[Gateway]:
    service = start_service(redis_url, tiny_model, tokenizer)
    gateway = start_gateway(service)
    yield gateway
    gateway.close()
    service.close()


@pytest.fixture
def oai(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url, api_key="dev", max_retries=0) as client:
        yield client


def _valid_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo", "Lima") and 1 <= args["days"] <= 7


def test_forced_calls_are_valid_and_go_back_into_the_conversation(oai: openai.OpenAI) -> None:
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "get_weather"}}]):
        done = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=choice,
                                           parallel_tool_calls=False, temperature=1.0, max_tokens=80, seed=seed)
        message = done.choices[0].message
        assert done.choices[0].finish_reason == "tool_calls" and message.tool_calls, message.content
        for call in message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name in ("get_weather", "get_time")
            if call.function.name == "get_weather":
                _valid_weather(call.function.arguments)
            else:
                assert json.loads(call.function.arguments) == {}
        if isinstance(choice, dict):
            assert {c.function.name for c in message.tool_calls} == {"get_weather"}
    # the call and its result back in the conversation, then a reply that must not call (tool_choice none)
    followed = oai.chat.completions.create(model=MODEL, tools=[WEATHER], tool_choice="none", temperature=0,
                                           max_tokens=6, messages=[
        *ASK, message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": '{"sky": "clear"}'} for c in message.tool_calls)])
    assert followed.choices[0].finish_reason in ("stop", "length") and not followed.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as unanswered:
        oai.chat.completions.create(model=MODEL, messages=[*ASK, {"role": "tool", "tool_call_id": "call_nope",
                                                                   "content": "x"}])
    assert unanswered.value.body["param"] == "messages[1].tool_call_id"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "unknown"}})


def test_streamed_tool_calls_equal_the_whole_reply(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=1.0, max_tokens=80,
                seed=11, parallel_tool_calls=False)
    whole = oai.chat.completions.create(**args).choices[0]
    calls, finish = [], None
    for chunk in oai.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    _valid_weather(calls[0].function.arguments)
