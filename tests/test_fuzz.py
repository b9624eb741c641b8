"""Property-based fuzzing of the public API (hypothesis): random CreateSession, GetSession, ListSessions, Fork,
Delete, Chat, Generate and Tokenize requests with random field values (garbage strings, extreme numbers, empty
values) against a real front and worker. Every answer is a success or a status from the allowed set (never
INTERNAL or UNKNOWN), the servers stay healthy, and a session the fuzzer never names keeps its state."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_serve.v1 import api_pb2, api_pb2_grpc, common_pb2
from tests.e2e_fixtures import InprocService
from worker.tokenizer import WorldTokenizer

DB = 7
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -0.0, 0.5]))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\n", "User:", "\x00", "é" * 5, "😀"]))


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model) -> Iterator[InprocService]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DB}"
    redis.Redis.from_url(url).flushdb()
    # Small limits keep every example cheap: at most 16 generated tokens, short prompts.
    svc = InprocService(url, tiny_model, WorldTokenizer(),
                        worker={"max_tokens_limit": 16, "default_max_tokens": 4, "max_prompt_tokens": 512},
                        front={"max_text_bytes": 2048, "max_ttl_s": 3600})
    try:
        yield svc
    finally:
        svc.close()


def sampling() -> st.SearchStrategy[common_pb2.Sampling]:
    ids = st.builds(lambda v: common_pb2.TokenIdList(ids=v), st.lists(INT32, max_size=3))
    fields = st.fixed_dictionaries({}, optional={
        "temperature": FLOATS, "top_p": FLOATS, "top_k": INT32, "presence_penalty": FLOATS,
        "frequency_penalty": FLOATS, "penalty_decay": FLOATS, "max_tokens": st.one_of(INT32, st.integers(1, 8)),
        "seed": st.integers(0, 2**64 - 1), "logprobs": st.one_of(INT32, st.integers(0, 3)),
        "banned_tokens": ids, "stop_token_ids": ids,
        "stop_strings": st.builds(lambda v: common_pb2.StringList(values=v), st.lists(TEXT, max_size=2)),
    })
    return fields.map(lambda f: common_pb2.Sampling(**f))


def operations(sid: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, object]]:
    model = st.one_of(st.just("tiny"), st.just("tiny"), TEXT)  # mostly the served model: past the front door
    ttl = st.one_of(st.none(), st.integers(-10, 10**9).map(lambda s: {"seconds": s}),
                    st.integers(1, 999_999_999).map(lambda n: {"nanos": n}))
    metadata = st.dictionaries(TEXT, TEXT, max_size=3)
    create = st.builds(
        lambda m, t, sp, pr, sa, tt, md: api_pb2.CreateSessionRequest(
            model=m, template=t, system_prompt=sp, preset=pr, default_sampling=sa, ttl=tt, metadata=md),
        model, st.integers(-1, 5), TEXT, st.one_of(st.just(""), TEXT), sampling(), ttl, metadata)
    turn = st.builds(
        lambda s, tx, sa, ev, ids: api_pb2.ChatTurn(session_id=s, text=tx, sampling=sa, turn_id="t",
                                                   expected_state_version=ev, return_token_ids=ids),
        sid, TEXT, sampling(), st.one_of(st.none(), st.integers(-5, 2**62)), st.booleans())
    chat = st.lists(st.one_of(turn.map(lambda t: api_pb2.ChatRequest(turn=t)),
                              st.builds(lambda t: api_pb2.ChatRequest(cancel=api_pb2.ChatCancel(turn_id=t)),
                                        st.sampled_from(["", "t", "other"]))),
                    min_size=0, max_size=3)
    generate = st.builds(
        lambda m, p, sa, s, e, ev: api_pb2.GenerateRequest(model=m, prompt=p, sampling=sa, session_id=s,
                                                           ephemeral=e, expected_state_version=ev, turn_id="g"),
        model, TEXT, sampling(), st.one_of(st.just(""), sid), st.booleans(), st.one_of(st.none(), st.integers(-3, 9)))
    by_method = {
        "CreateSession": create,
        "GetSession": sid.map(lambda s: api_pb2.GetSessionRequest(session_id=s)),
        "DeleteSession": sid.map(lambda s: api_pb2.DeleteSessionRequest(session_id=s)),
        "ForkSession": st.builds(
            lambda s, tt, md, sa, ev: api_pb2.ForkSessionRequest(session_id=s, ttl=tt, metadata=md,
                                                                 default_sampling=sa, expected_state_version=ev),
            sid, ttl, metadata, st.one_of(st.none(), sampling()), st.one_of(st.none(), st.integers(-3, 9))),
        "ListSessions": st.builds(lambda n, tok, m: api_pb2.ListSessionsRequest(page_size=n, page_token=tok, model=m),
                                  INT32, TEXT, st.one_of(st.just(""), model)),
        "Chat": chat,
        "Generate": generate,
        "Tokenize": st.builds(lambda m, t: api_pb2.TokenizeRequest(model=m, text=t), model, TEXT),
    }
    # The method first, uniformly: otherwise hypothesis favours the first branches of a one_of.
    return st.sampled_from(sorted(by_method)).flatmap(lambda m: by_method[m].map(lambda r: (m, r)))


def call(stub: api_pb2_grpc.RwkvServiceStub, method: str, request: object) -> tuple[grpc.StatusCode, object]:
    try:
        if method == "Chat":
            return grpc.StatusCode.OK, list(stub.Chat(iter(request), timeout=20))
        if method == "Generate":
            return grpc.StatusCode.OK, list(stub.Generate(request, timeout=20))
        return grpc.StatusCode.OK, getattr(stub, method)(request, timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_random_requests_get_allowed_statuses_and_leave_other_sessions_alone(service: InprocService) -> None:
    db = redis.Redis.from_url(service.redis_url)
    with grpc.insecure_channel(service.target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        canary = stub.CreateSession(api_pb2.CreateSessionRequest(
            model="tiny", default_sampling=common_pb2.Sampling(temperature=0, max_tokens=3)))
        list(stub.Chat(iter([api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=canary.session_id, text="hi"))])))
        canary_keys = (f"rwkv:{{{canary.session_id}}}:meta", f"rwkv:{{{canary.session_id}}}:state")
        canary_before = (db.hgetall(canary_keys[0]), db.get(canary_keys[1]))
        # Sessions the fuzzer may name: three real ones, garbage, empty and well-formed unknown ids; never the canary.
        def new_session() -> str:
            return stub.CreateSession(api_pb2.CreateSessionRequest(
                model="tiny", default_sampling=common_pb2.Sampling(max_tokens=4))).session_id

        pool = [new_session() for _ in range(3)]
        real = st.integers(0, len(pool) - 1).map(lambda i: pool[i])  # read at draw time: deleted ones are replaced
        ids = st.one_of(real, real, TEXT, st.just("WellFormedButUnknown00"), st.just(""))
        seen: dict[str, int] = {}

        @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(op=operations(ids))
        def one_request(op: tuple[str, object]) -> None:
            method, request = op
            status, answer = call(stub, method, request)
            seen[f"{method} {status.name}"] = seen.get(f"{method} {status.name}", 0) + 1
            assert status in ALLOWED, (method, request, status, answer)
            if method in ("CreateSession", "ForkSession") and status is grpc.StatusCode.OK:
                assert answer.session_id != canary.session_id
            if method == "DeleteSession" and status is grpc.StatusCode.OK and request.session_id in pool:
                pool[pool.index(request.session_id)] = new_session()

        one_request()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (db.hgetall(canary_keys[0]), db.get(canary_keys[1])) == canary_before
        # The canary still works, and the fuzzer reached more than the front door.
        list(stub.Chat(iter([api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=canary.session_id, text="ok"))])))
        assert db.hget(canary_keys[0], "version") == b"2"
        assert any(k.endswith(" OK") and k.split()[0] in ("Chat", "Generate") for k in seen), seen
    db.close()
