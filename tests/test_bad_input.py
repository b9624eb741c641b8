"""Bad input gets a clear status and changes nothing: after every refused request the session's stored metadata and
state bytes are exactly what they were. A real front and worker (tiny model, no local state cache, so every turn
reads the stored state) in this process, real Redis, real gRPC."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
import redis

from rwkv_serve.v1 import api_pb2, api_pb2_grpc, common_pb2
from tests.e2e_fixtures import InprocService
from worker.state import state_to_bytes
from worker.tokenizer import WorldTokenizer

DB = 6  # a database of its own: other tests flush db 0 between tests
MAX_PROMPT_TOKENS, MAX_TEXT_BYTES, MAX_TOKENS = 256, 4096, 64
OK = grpc.StatusCode.OK


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model) -> Iterator[InprocService]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    svc = InprocService(
        url, tiny_model, WorldTokenizer(),
        worker={"cache_bytes": 0, "max_prompt_tokens": MAX_PROMPT_TOKENS, "max_tokens_limit": MAX_TOKENS},
        front={"max_text_bytes": MAX_TEXT_BYTES, "metadata_max_entries": 4, "metadata_max_key_bytes": 16,
               "metadata_max_value_bytes": 32, "max_ttl_s": 3600})
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def stub(service: InprocService) -> Iterator[api_pb2_grpc.RwkvServiceStub]:
    with grpc.insecure_channel(service.target) as channel:
        yield api_pb2_grpc.RwkvServiceStub(channel)


@pytest.fixture(scope="module")
def db(service: InprocService) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(service.redis_url)
    yield client
    client.close()


def code(call, *args, **kwargs) -> grpc.StatusCode:
    """The status of a call (streams are read to the end)."""
    try:
        result = call(*args, timeout=30, **kwargs)
        if not isinstance(result, (api_pb2.Session, api_pb2.ListSessionsResponse, api_pb2.TokenizeResponse,
                                   api_pb2.DeleteSessionResponse)):
            list(result)
        return OK
    except grpc.RpcError as e:
        return e.code()


def chat(stub, sid: str, text: str = "Hello", **sampling) -> grpc.StatusCode:
    turn = api_pb2.ChatTurn(session_id=sid, text=text, sampling=common_pb2.Sampling(**sampling))
    return code(stub.Chat, iter([api_pb2.ChatRequest(turn=turn)]))


def keys(sid: str) -> tuple[str, str]:
    return f"rwkv:{{{sid}}}:meta", f"rwkv:{{{sid}}}:state"


def stored(db: redis.Redis, sid: str) -> tuple[dict, bytes | None]:
    meta, state = keys(sid)
    return db.hgetall(meta), db.get(state)


@pytest.fixture
def session(stub, db) -> str:
    """A session with one committed turn (greedy, short replies)."""
    sid = stub.CreateSession(api_pb2.CreateSessionRequest(
        model="tiny", default_sampling=common_pb2.Sampling(temperature=0, max_tokens=4))).session_id
    assert chat(stub, sid) == OK
    meta, state = stored(db, sid)
    assert meta[b"version"] == b"1" and state
    return sid


def test_oversized_prompts_are_invalid_and_change_nothing(stub, db, session) -> None:
    before = stored(db, session)
    many_tokens = " x" * (MAX_PROMPT_TOKENS + 10)  # fits the front's byte limit; over the worker's token limit
    too_many_bytes = "y" * (MAX_TEXT_BYTES + 1)
    refusals = {
        "chat, tokens": chat(stub, session, many_tokens),
        "chat, bytes": chat(stub, session, too_many_bytes),
        "generate on the session": code(stub.Generate, api_pb2.GenerateRequest(session_id=session, prompt=many_tokens)),
        "stateless generate": code(stub.Generate, api_pb2.GenerateRequest(model="tiny", prompt=too_many_bytes)),
        "tokenize": code(stub.Tokenize, api_pb2.TokenizeRequest(model="tiny", text=too_many_bytes)),
        "system prompt": code(stub.CreateSession, api_pb2.CreateSessionRequest(model="tiny",
                                                                               system_prompt=too_many_bytes)),
    }
    assert refusals == dict.fromkeys(refusals, grpc.StatusCode.INVALID_ARGUMENT)
    assert stored(db, session) == before
    assert chat(stub, session, " x" * (MAX_PROMPT_TOKENS // 4)) == OK  # under the limit it runs


BAD_SAMPLING = {
    "negative temperature": {"temperature": -1.0},
    "NaN temperature": {"temperature": math.nan},
    "infinite temperature": {"temperature": math.inf},
    "top_p 0": {"top_p": 0.0},
    "top_p above 1": {"top_p": 1.5},
    "NaN top_p": {"top_p": math.nan},
    "negative top_k": {"top_k": -1},
    "NaN presence penalty": {"presence_penalty": math.nan},
    "infinite frequency penalty": {"frequency_penalty": -math.inf},
    "penalty decay above 1": {"penalty_decay": 2.0},
    "max_tokens 0": {"max_tokens": 0},
    "negative max_tokens": {"max_tokens": -5},
    "max_tokens above the limit": {"max_tokens": MAX_TOKENS + 1},
    "negative logprobs": {"logprobs": -1},
    "too many logprobs": {"logprobs": 100_000},
    "banned id past the vocabulary": {"banned_tokens": common_pb2.TokenIdList(ids=[65536])},
    "negative banned id": {"banned_tokens": common_pb2.TokenIdList(ids=[-1])},
    "stop id past the vocabulary": {"stop_token_ids": common_pb2.TokenIdList(ids=[1, 70_000])},
    "empty stop string": {"stop_strings": common_pb2.StringList(values=[""])},
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLING))
def test_invalid_sampling_is_invalid_and_changes_nothing(stub, db, session, case: str) -> None:
    bad = BAD_SAMPLING[case]
    before = stored(db, session)
    assert chat(stub, session, **bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stub.Generate, api_pb2.GenerateRequest(model="tiny", prompt="x", sampling=common_pb2.Sampling(**bad))
                ) == grpc.StatusCode.INVALID_ARGUMENT
    if case != "max_tokens above the limit":  # the front does not know a worker's limit; a turn finds out
        assert code(stub.CreateSession, api_pb2.CreateSessionRequest(
            model="tiny", default_sampling=common_pb2.Sampling(**bad))) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(stub.ForkSession, api_pb2.ForkSessionRequest(
            session_id=session, default_sampling=common_pb2.Sampling(**bad))) == grpc.StatusCode.INVALID_ARGUMENT
    assert stored(db, session) == before


def test_unknown_deleted_and_expired_sessions_are_not_found(stub, db, session) -> None:
    import time

    expiring = stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny", ttl={"nanos": 300_000_000})).session_id
    deleted = stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny")).session_id
    stub.DeleteSession(api_pb2.DeleteSessionRequest(session_id=deleted))
    before = stored(db, session)
    time.sleep(0.4)
    for sid in ("NeverCreatedButWellFormed0", deleted, expiring):
        assert code(stub.GetSession, api_pb2.GetSessionRequest(session_id=sid)) == grpc.StatusCode.NOT_FOUND
        assert chat(stub, sid) == grpc.StatusCode.NOT_FOUND
        assert code(stub.Generate, api_pb2.GenerateRequest(session_id=sid, prompt="x")) == grpc.StatusCode.NOT_FOUND
        assert code(stub.ForkSession, api_pb2.ForkSessionRequest(session_id=sid)) == grpc.StatusCode.NOT_FOUND
        assert code(stub.DeleteSession, api_pb2.DeleteSessionRequest(session_id=sid)) == grpc.StatusCode.NOT_FOUND
        assert not db.exists(*keys(sid))  # nothing was created by asking
    assert code(stub.GetSession, api_pb2.GetSessionRequest(session_id="no spaces/allowed")
                ) == grpc.StatusCode.INVALID_ARGUMENT
    assert stored(db, session) == before


def _corruptions(good: bytes, tiny_model) -> dict[str, bytes]:
    flipped_payload = bytearray(good)
    flipped_payload[len(good) // 2] ^= 0x10
    flipped_header = bytearray(good)
    flipped_header[61] ^= 0x01  # the token count: only the checksum can tell
    foreign = state_to_bytes(tiny_model.init_state(1), bytes(range(32)), 7)  # same shapes, another model's weights
    return {
        "another model's record": foreign,
        "truncated": good[: len(good) // 2],
        "bit flipped in the payload": bytes(flipped_payload),
        "bit flipped in the header's token count": bytes(flipped_header),
        "one byte too many": good + b"\0",
        "garbage": b"not a state record",
        "empty": b"",
    }


def test_corrupt_or_foreign_state_bytes_are_data_loss_and_left_as_they_are(stub, db, session, tiny_model) -> None:
    _, state_key = keys(session)
    good = db.get(state_key)
    for name, bad in _corruptions(good, tiny_model).items():
        db.set(state_key, bad, keepttl=True)
        before = stored(db, session)
        results = {
            "chat": chat(stub, session),
            "generate": code(stub.Generate, api_pb2.GenerateRequest(session_id=session, prompt="x")),
            "ephemeral": code(stub.Generate, api_pb2.GenerateRequest(session_id=session, prompt="x", ephemeral=True)),
        }
        refused = {grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION}
        assert set(results.values()) <= refused, (name, results)
        assert stored(db, session) == before, name  # the bad bytes stay for an operator to inspect
    db.set(state_key, good, keepttl=True)
    assert chat(stub, session) == OK  # the real record still works: the session continues at version 2
    assert db.hget(keys(session)[0], "version") == b"2"


def test_unreadable_metadata_is_data_loss(stub, db, session) -> None:
    meta_key, _ = keys(session)
    db.hset(meta_key, "version", "not-a-number")
    before = stored(db, session)
    assert code(stub.GetSession, api_pb2.GetSessionRequest(session_id=session)) == grpc.StatusCode.DATA_LOSS
    assert chat(stub, session) == grpc.StatusCode.DATA_LOSS
    assert stored(db, session) == before


def _raw(method: str, kind: str, request: bytes, channel: grpc.Channel) -> grpc.StatusCode:
    """Sends bytes as they are (no protobuf check on this side), like a client in another language could."""
    path = f"/rwkv_serve.v1.RwkvService/{method}"
    identity = lambda b: b  # noqa: E731
    try:
        if kind == "unary":
            channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(request, timeout=10)
        elif kind == "server_stream":
            list(channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                request, timeout=10))
        else:
            list(channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)(
                iter([request]), timeout=10))
        return OK
    except grpc.RpcError as e:
        return e.code()


def test_text_that_is_not_utf8_is_invalid(service: InprocService, stub, db, session) -> None:
    def spoiled(message) -> bytes:  # the placeholder's bytes replaced by invalid UTF-8 of the same length
        data = message.SerializeToString()
        assert data.count(b"QQQQ") == 1
        return data.replace(b"QQQQ", b"\xff\xfeA\xc3")

    before = stored(db, session)
    with grpc.insecure_channel(service.target) as channel:
        results = {
            "Tokenize": _raw("Tokenize", "unary", spoiled(api_pb2.TokenizeRequest(model="tiny", text="QQQQ")), channel),
            "CreateSession": _raw("CreateSession", "unary", spoiled(api_pb2.CreateSessionRequest(
                model="tiny", metadata={"QQQQ": "v"})), channel),
            "Generate": _raw("Generate", "server_stream", spoiled(api_pb2.GenerateRequest(
                session_id=session, prompt="QQQQ")), channel),
            "Chat": _raw("Chat", "stream", spoiled(api_pb2.ChatRequest(turn=api_pb2.ChatTurn(
                session_id=session, text="QQQQ"))), channel),
        }
    assert results == dict.fromkeys(results, grpc.StatusCode.INVALID_ARGUMENT)
    assert stored(db, session) == before
    assert chat(stub, session) == OK  # and the front serves on


def test_oversized_metadata_and_global_session_limits(stub, db, session) -> None:
    def create(**kwargs) -> grpc.StatusCode:
        return code(stub.CreateSession, api_pb2.CreateSessionRequest(model="tiny", **kwargs))

    count = len(db.keys("rwkv:{*}:meta"))
    before = stored(db, session)
    bad = {
        "too many entries": create(metadata={f"k{i}": "v" for i in range(5)}),
        "key too long": create(metadata={"k" * 17: "v"}),
        "value too long in bytes": create(metadata={"k": "é" * 17}),  # 17 characters, 34 bytes
        "empty key": create(metadata={"": "v"}),
        "ttl past the maximum": create(ttl={"seconds": 3601}),
        "negative ttl": create(ttl={"seconds": -1}),
        "unknown template": create(template=99),
        "fork with too many entries": code(stub.ForkSession, api_pb2.ForkSessionRequest(
            session_id=session, metadata={f"k{i}": "v" for i in range(5)})),
    }
    assert bad == dict.fromkeys(bad, grpc.StatusCode.INVALID_ARGUMENT)
    assert create(metadata={f"k{i}": "é" * 16 for i in range(4)}) == OK  # at the limits, in bytes
    assert len(db.keys("rwkv:{*}:meta")) == count + 1  # only the valid one was stored
    assert stored(db, session) == before
