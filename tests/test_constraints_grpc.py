"""Structured output through gRPC: the SDK's response_format keyword argument, a real front and a real worker (the
tiny random model at temperature 1), session defaults carrying a constraint, bad formats as INVALID_ARGUMENT with
the compiler's message, and unconstrained turns running beside constrained ones unaffected."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from common.tools import parse_tool_calls, tool_grammar
from rwkv_serve.v1 import api_pb2, api_pb2_grpc, common_pb2
from rwkv_serve_client import RWKVClient, StopReason
from rwkv_serve_client.errors import InvalidArgumentError
from tests.e2e_fixtures import InprocService, inproc_service
from tests.test_constraints import ORDER, PERSON
from tests.test_constraints_tools import SCHEMAS, TOOLS
from worker.tokenizer import WorldTokenizer

DB = 9  # a database of its own: other tests flush db 0 between tests
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model) -> Iterator[InprocService]:
    with inproc_service(redis_url, DB, tiny_model, WorldTokenizer(), worker={"max_batch": 8, "max_queued": 16}) as svc:
        yield svc


@pytest.fixture(scope="module")
def rwkv(service: InprocService) -> Iterator[RWKVClient]:
    with RWKVClient(service.target) as client:
        yield client


def test_chat_turns_follow_a_json_schema(rwkv: RWKVClient) -> None:
    for schema in (PERSON, ORDER):
        session = rwkv.create_session("tiny", temperature=1.0, max_tokens=200)
        for seed in range(3):  # dict schemas are sent as JSON text; turns after the first continue the session
            result = rwkv.say(session.session_id, "Describe it as JSON.", seed=seed, response_format={
                "json_schema": schema})
            assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE, result.text
            jsonschema.validate(json.loads(result.text), schema)
        assert rwkv.get_session(session.session_id).state_version == 3


def test_generate_follows_a_regex_and_a_lark_grammar(rwkv: RWKVClient) -> None:
    for seed in range(3):
        result = rwkv.complete("Date:", model="tiny", temperature=1.0, seed=seed, max_tokens=40,
                               response_format={"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"})
        assert result.stop_reason is StopReason.CONSTRAINT_COMPLETE
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", result.text)
        result = rwkv.complete("Sum:", model="tiny", temperature=1.0, seed=seed, max_tokens=60,
                               response_format={"lark_grammar": 'start: NUM ("+" NUM){0,4}\nNUM: /[1-9][0-9]?/'})
        assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?){0,4}", result.text), result.text


def test_session_defaults_carry_a_response_format(rwkv: RWKVClient) -> None:
    fmt = {"regex": "(red|green|blue)"}
    session = rwkv.create_session("tiny", temperature=1.0, response_format=fmt)
    assert rwkv.get_session(session.session_id).default_sampling["response_format"] == fmt
    for seed in range(3):
        result = rwkv.say(session.session_id, "A colour?", seed=seed)
        assert result.text in ("red", "green", "blue") and result.stop_reason is StopReason.CONSTRAINT_COMPLETE
    fork = rwkv.fork_session(session.session_id)
    assert rwkv.get_session(fork.session_id).default_sampling["response_format"] == fmt


def test_forced_tool_calls_through_grpc(rwkv: RWKVClient) -> None:
    fmt = tool_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    for seed in range(3):
        result = rwkv.complete("User: weather?\n\nAssistant:", model="tiny", temperature=1.0, seed=seed,
                               max_tokens=200, response_format=fmt)
        calls = parse_tool_calls(result.text).calls
        assert calls and all(c.name == "get_weather" for c in calls), result.text
        for call in calls:
            jsonschema.validate(dict(call.arguments), SCHEMAS["get_weather"])


@pytest.mark.parametrize("fmt, message", [
    ({"json_schema": '{"type": "frobnicate"}'}, "frobnicate"),  # compiled by the worker
    ({"regex": "a(b"}, "unclosed group"),
    ({"json_schema": "{not json"}, "not valid JSON"),  # caught by the front's check
    ({"regex": "x" * (64 * 1024 + 1)}, "the limit is 65536"),
])
def test_bad_formats_are_invalid_argument_with_the_compilers_message(rwkv: RWKVClient, fmt, message) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        rwkv.complete("x", model="tiny", response_format=fmt)
    session = rwkv.create_session("tiny")
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        rwkv.say(session.session_id, "hi", response_format=fmt)
    assert rwkv.get_session(session.session_id).state_version == 0


def test_a_bad_session_default_fails_at_create_session(rwkv: RWKVClient, service: InprocService) -> None:
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        rwkv.create_session("tiny", response_format={"json_schema": "{bad"})

    # A ResponseFormat message with none of its kinds set (the SDK cannot send one; a raw client can).
    with grpc.insecure_channel(service.target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        request = api_pb2.CreateSessionRequest(model="tiny", default_sampling=common_pb2.Sampling(
            response_format=common_pb2.ResponseFormat()))
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateSession(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "exactly one" in info.value.details()


def test_the_sdk_refuses_a_malformed_response_format_before_sending(rwkv: RWKVClient) -> None:
    with pytest.raises(TypeError, match="unknown response_format kind"):
        rwkv.complete("x", model="tiny", response_format={"xml": "<a/>"})
    with pytest.raises(TypeError, match="response_format must be one of"):
        rwkv.complete("x", model="tiny", response_format="json")


def test_unconstrained_turns_beside_constrained_ones_are_unaffected(rwkv: RWKVClient) -> None:
    prompts = [f"User: question {i}\n\nAssistant:" for i in range(3)]

    def greedy(prompt: str) -> list[int]:
        return rwkv.complete(prompt, model="tiny", temperature=0, max_tokens=24, stop_token_ids=[],
                             return_token_ids=True).token_ids

    def constrained(seed: int) -> str:
        return rwkv.complete("Person:", model="tiny", temperature=1.0, seed=seed, max_tokens=200,
                             response_format={"json_schema": PERSON}).text

    alone = [greedy(p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:
        json_texts = [pool.submit(constrained, s) for s in range(3)]
        together = [pool.submit(greedy, p) for p in prompts]
        assert [f.result() for f in together] == alone
        for f in json_texts:
            jsonschema.validate(json.loads(f.result()), PERSON)
