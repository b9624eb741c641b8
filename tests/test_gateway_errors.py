"""Every error the gateway answers, in OpenAI's JSON shape with the status the openai SDK maps, against real
processes: 400 (bad values, unknown and unsupported parameters), 401, tenants kept apart (404), 404, 409, 413,
429 with Retry-After (the gateway's bound and the front's overload), 503, 504; and a client that goes away
mid-stream frees its worker slot."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from tests.e2e_fixtures import key_entry
from tests.test_gateway_support import MODEL, Gateway, start_gateway, start_service, worker_busy

pytestmark = pytest.mark.usefixtures("one_thread")
KEY_A, KEY_B = "rwkv_test_key_tenant_a", "rwkv_test_key_tenant_b"
KEYS = [key_entry("tenant-a", KEY_A), key_entry("tenant-b", KEY_B)]
# A raw completion (no "\n\n" stop) with end of text banned: nothing but the limits can end it early.
LONG = dict(model=MODEL, prompt="Go on.", max_tokens=4000, temperature=1.0, logit_bias={"0": -100})


@pytest.fixture(scope="module")
def service(redis_url, tiny_model, tokenizer, one_thread):
    # API keys on, and a front that relays one turn at a time (its overload is a 429 below)
    service = start_service(redis_url, tiny_model, tokenizer,
                            front={"auth_mode": "keys", "api_key_hashes": KEYS, "max_inflight_turns": 1,
                                   "overload_retry_after_s": 2.0})
    yield service
    service.close()


@pytest.fixture(scope="module")
def gateway(service) -> Iterator[Gateway]:
    gateway = start_gateway(service, auth_mode="keys", api_key_hashes=KEYS)
    yield gateway
    gateway.close()


def _raw(url: str, body: bytes | None = None, key: str | None = KEY_A) -> tuple[int, dict]:
    """A plain HTTP request (what the openai SDK would never send): status and JSON body."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def client(gateway: Gateway, key: str = KEY_A, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key=key, max_retries=0, **kwargs)


def _chat(oai: openai.OpenAI, **kwargs):
    args = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kwargs}
    return oai.chat.completions.create(**args)


def test_bad_input_is_400_naming_the_parameter(gateway: Gateway) -> None:
    with client(gateway) as oai:
        cases = [({"temperature": 5}, "temperature", "invalid_value"),
                 ({"extra_body": {"frobnicate": 1}}, "frobnicate", "invalid_value"),
                 ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
                 ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "invalid_value"),
                 ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),  # (without logprobs: true)
                 ({"n": 100}, "n", "invalid_value"),
                 ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
                 ({"max_tokens": 10**6}, "max_tokens", "invalid_value")]
        for kwargs, param, code in cases:
            with pytest.raises(openai.BadRequestError) as bad:
                _chat(oai, **kwargs)
            assert bad.value.body["param"] == param and bad.value.body["code"] == code, kwargs
            assert "Traceback" not in bad.value.message
        with pytest.raises(openai.BadRequestError) as empty:
            oai.chat.completions.create(model=MODEL, messages=[])
        assert empty.value.body["param"] == "messages"
        with pytest.raises(openai.BadRequestError):
            oai.responses.create(model=MODEL, input="x", background=True)
        with pytest.raises(openai.BadRequestError) as metadata:
            oai.responses.create(model=MODEL, input="x", metadata={f"k{i}": "v" for i in range(17)})
        assert metadata.value.body["param"] == "metadata"
    status, body = _raw(f"{gateway.url}/chat/completions", b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"



def test_a_body_over_the_limit_is_413(service) -> None:
    small = start_gateway(service, auth_mode="keys", api_key_hashes=KEYS, max_body_bytes=1024)
    try:  # (a small limit: the refusal comes before the body is read, so the client's whole body must fit the
        # socket buffers for it to read the answer)
        status, body = _raw(f"{small.url}/completions", json.dumps({"model": MODEL, "prompt": "x" * 4000}).encode())
        assert status == 413 and body["error"]["code"] == "request_too_large"
        status, _ = _raw(f"{small.url}/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}
                                                                ).encode())
        assert status == 200
    finally:
        small.close()


def test_missing_or_unknown_key_is_401(gateway: Gateway) -> None:
    with client(gateway, key="rwkv_not_a_key") as oai:
        with pytest.raises(openai.AuthenticationError):
            _chat(oai)
        with pytest.raises(openai.AuthenticationError):
            oai.models.list()
        with pytest.raises(openai.AuthenticationError):
            oai.responses.retrieve("resp_" + "0" * 32)
    status, body = _raw(f"{gateway.url}/models", key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_tenants_cannot_see_each_others_responses(gateway: Gateway, service) -> None:
    import redis

    from service.auth import hash_api_key

    stored_key = "rwkv_test_key_stored_in_redis"  # as `rwkv-admin keys create` stores one: found by both
    redis.Redis.from_url(service.redis_url).set(f"rwkv:apikey:{hash_api_key(stored_key)}", "tenant-c")
    with client(gateway, stored_key) as c, client(gateway, KEY_A) as a:
        theirs = c.responses.create(model=MODEL, input="Mine.", temperature=0, max_output_tokens=2)
        assert c.responses.retrieve(theirs.id).id == theirs.id
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(theirs.id)
    with client(gateway, KEY_A) as a, client(gateway, KEY_B) as b:
        mine = a.responses.create(model=MODEL, input="Secret.", temperature=0, max_output_tokens=3)
        assert a.responses.retrieve(mine.id).output_text == mine.output_text
        with pytest.raises(openai.NotFoundError):
            b.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.create(model=MODEL, input="Mine now?", previous_response_id=mine.id)
        with pytest.raises(openai.NotFoundError):
            b.responses.delete(mine.id)
        assert a.responses.retrieve(mine.id).id == mine.id  # still there


def test_unknown_model_response_and_url_are_404(gateway: Gateway) -> None:
    with client(gateway) as oai:
        with pytest.raises(openai.NotFoundError) as model:
            _chat(oai, model="no-such-model")
        assert model.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            oai.responses.retrieve("resp_nonsense")
    status, body = _raw(f"{gateway.url}/nothing/here")
    assert status == 404 and body["error"]["message"] == "unknown URL: GET /v1/nothing/here"


def _hold_stream(oai: openai.OpenAI, started: threading.Event, stop: threading.Event, **kwargs) -> None:
    with oai.completions.create(stream=True, **{**LONG, **kwargs}) as stream:
        for _ in stream:
            started.set()
            if stop.is_set():
                return


def _holding(gateway: Gateway):
    started, stop = threading.Event(), threading.Event()
    oai = client(gateway)
    thread = threading.Thread(target=_hold_stream, args=(oai, started, stop), daemon=True)
    thread.start()
    assert started.wait(30)
    return stop, thread, oai


def test_overload_is_429_with_retry_after(gateway: Gateway, service) -> None:
    stop, thread, holder = _holding(gateway)
    try:
        with client(gateway) as oai:  # the front relays one turn at a time: this one is refused at once
            with pytest.raises(openai.RateLimitError) as refused:
                _chat(oai)
        assert refused.value.response.headers["retry-after"] == "2"
        assert refused.value.response.headers["retry-after-ms"] == "2000"
        assert refused.value.body["code"] == "rate_limit_exceeded"
    finally:
        stop.set()
        thread.join(30)
        holder.close()


def test_the_gateways_own_bound_is_429(service) -> None:
    bounded = start_gateway(service, auth_mode="keys", api_key_hashes=KEYS, max_concurrent_streams=1,
                            overload_retry_after_s=0.5)
    try:
        stop, thread, holder = _holding(bounded)
        try:
            with client(bounded) as oai:
                with pytest.raises(openai.RateLimitError) as refused:
                    _chat(oai)
            assert refused.value.body["code"] == "rate_limit_exceeded"
            assert refused.value.response.headers["retry-after-ms"] == "500"
        finally:
            stop.set()
            thread.join(30)
            holder.close()
    finally:
        bounded.close()


def test_busy_conversation_is_409(gateway: Gateway) -> None:
    with client(gateway) as oai:
        first = oai.responses.create(model=MODEL, input="Start.", temperature=0, max_output_tokens=3)
        with oai.responses.create(model=MODEL, input="Go on forever.", previous_response_id=first.id,
                                  max_output_tokens=4000, stream=True) as running:
            next(iter(running))
            with client(gateway, KEY_A) as other:  # the gateway's bound is not the limit here: the front's is 1,
                with pytest.raises((openai.ConflictError, openai.RateLimitError)) as busy:  # so either may answer
                    other.responses.create(model=MODEL, input="Me too.", previous_response_id=first.id,
                                           max_output_tokens=3)
    if isinstance(busy.value, openai.ConflictError):
        assert busy.value.body["code"] == "conversation_busy"


def test_no_front_is_503_and_a_deadline_is_504(service) -> None:
    from tests.conftest import free_port

    dead = start_gateway(service, front_target=f"127.0.0.1:{free_port()}", auth_mode="keys", api_key_hashes=KEYS)
    try:
        with client(dead) as oai:
            with pytest.raises(openai.InternalServerError) as unavailable:
                _chat(oai)
        assert unavailable.value.status_code == 503 and unavailable.value.body["code"] == "service_unavailable"
    finally:
        dead.close()
    hurried = start_gateway(service, request_timeout_s=0.3, auth_mode="keys", api_key_hashes=KEYS)
    try:
        with client(hurried) as oai:
            with pytest.raises(openai.APIStatusError) as late:
                oai.completions.create(**LONG)
        assert late.value.status_code == 504 and late.value.body["code"] == "timeout"
    finally:
        hurried.close()
    deadline = time.monotonic() + 5
    while worker_busy(service) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker_busy(service) == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(gateway: Gateway, service) -> None:
    with client(gateway) as oai:
        stream = oai.completions.create(stream=True, **LONG)
        for _, _chunk in zip(range(5), stream):
            pass
        assert worker_busy(service) == 1
        closed = time.monotonic()
        stream.close()  # the HTTP connection goes away mid-turn
        while worker_busy(service) and time.monotonic() - closed < 5:
            time.sleep(0.01)
        assert worker_busy(service) == 0 and time.monotonic() - closed < 2.0
        assert _chat(oai).choices[0].message.content is not None  # the slot is free for the next request


def test_a_client_that_gives_up_on_a_whole_reply_frees_its_slot_too(gateway: Gateway, service) -> None:
    with client(gateway, timeout=1.0) as oai:  # the openai SDK closes the connection at its timeout
        with pytest.raises(openai.APITimeoutError):
            oai.completions.create(**LONG)  # not streamed: 4000 tokens take far longer than 1 s here
    gone = time.monotonic()
    while worker_busy(service) and time.monotonic() - gone < 5:
        time.sleep(0.01)
    assert worker_busy(service) == 0 and time.monotonic() - gone < 2.0


def test_a_failure_mid_stream_is_one_error_event(service) -> None:
    hurried = start_gateway(service, request_timeout_s=1.0, auth_mode="keys", api_key_hashes=KEYS)
    try:
        with client(hurried) as oai:
            texts = []
            with pytest.raises(openai.APIError) as failed:  # raised by the SDK from the stream's error event
                for chunk in oai.completions.create(stream=True, **LONG):
                    texts.append(chunk.choices[0].text)
            assert texts and failed.value.body["code"] == "timeout"  # the stream had started: 200, then the error
    finally:
        hurried.close()
    deadline = time.monotonic() + 5
    while worker_busy(service) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker_busy(service) == 0
