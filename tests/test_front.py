"""Front tests: routing as plain objects, and the real grpc.aio front on port 0 against real Redis and scripted
workers (tests/fakes.py) on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.errors import ERROR_KEY, Overloaded, SessionBusy
from common.worker_api import ModelDescription, WorkerLoad
from rwkv_serve.v1 import api_pb2, api_pb2_grpc, common_pb2
from service.router import WorkerDirectory, rendezvous_order
from tests.e2e_fixtures import fakes, front_factory, key_entry  # noqa: F401  (fixtures)

# ---- plain objects ------------------------------------------------------------------------------------------


def _worker(worker_id: str, address: str, model: str, **load: object) -> WorkerLoad:
    return WorkerLoad(worker_id, address, ModelDescription(model), **load)


def _workers(n: int) -> list[WorkerLoad]:
    return [_worker(f"w{i}", f"127.0.0.1:{1000 + i}", "m") for i in range(n)]


def test_rendezvous_moves_only_the_sessions_of_a_removed_worker() -> None:
    workers = _workers(5)
    sessions = [f"session-{i}" for i in range(400)]
    home = {s: rendezvous_order(s, workers)[0].worker_id for s in sessions}
    counts = {w.worker_id: list(home.values()).count(w.worker_id) for w in workers}
    assert min(counts.values()) > 40  # spread over every worker
    survivors = [w for w in workers if w.worker_id != "w2"]
    for s in sessions:
        new_home = rendezvous_order(s, survivors)[0].worker_id
        if home[s] != "w2":
            assert new_home == home[s]  # untouched
        else:
            assert new_home == rendezvous_order(s, workers)[1].worker_id  # its second choice


async def test_directory_ranks_suspect_and_saturated_workers_last() -> None:
    records = [_worker("a", "x:1", "m"), _worker("b", "x:2", "m", queued=4, max_queued=4), _worker("c", "x:3", "m"),
               _worker("d", "x:4", "other"), _worker("e", "x:5", "m", serving=False)]
    now = [0.0]

    async def list_workers() -> list[WorkerLoad]:
        return records

    directory = WorkerDirectory(list_workers, refresh_s=0.0, suspect_s=5.0, clock=lambda: now[0])
    order = await directory.for_session("s1", "m")
    assert {w.worker_id for w in order} == {"a", "b", "c"}  # other model and draining worker left out
    assert order[-1].worker_id == "b"
    first = order[0]
    directory.mark_failed(first)
    order2 = await directory.for_session("s1", "m")
    assert order2[-1] == first and order2[-2].worker_id == "b"
    now[0] = 6.0  # the mark expires
    assert (await directory.for_session("s1", "m"))[0] == first


def test_worker_registry_records_are_understood() -> None:
    description = ModelDescription("m", n_layer=2, n_embd=128, n_head=2, vocab_size=65536, state_bytes=1234,
                                   fingerprint="ab", random_init=True)
    load = WorkerLoad("w9", "10.0.0.1:7000", description, capacity=8, active=3, queued=5, max_queued=5,
                      serving=True)
    info = WorkerLoad.from_record(json.loads(json.dumps(load.to_record())))  # through Redis as JSON
    assert info == load
    assert info.load == 1.0 and info.saturated
    pb = info.model.to_pb()
    assert (pb.id, pb.n_layer, pb.state_bytes, pb.fingerprint, pb.random_init) == ("m", 2, 1234, "ab", True)


# ---- the gRPC front ---------------------------------------------------------------------------------------


def _stub(target: str) -> tuple[grpc.aio.Channel, api_pb2_grpc.RwkvServiceStub]:
    channel = grpc.aio.insecure_channel(target)
    return channel, api_pb2_grpc.RwkvServiceStub(channel)


def _turn(sid: str, text: str, turn_id: str = "t", **sampling: object) -> api_pb2.ChatRequest:
    return api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=sid, text=text, turn_id=turn_id,
                                                     sampling=common_pb2.Sampling(**sampling)))


def _text(events: list[common_pb2.ChatEvent]) -> str:
    return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")


async def _chat(stub: api_pb2_grpc.RwkvServiceStub, *requests: api_pb2.ChatRequest,
                **kwargs: object) -> list[common_pb2.ChatEvent]:
    return [event async for event in stub.Chat(iter(requests), **kwargs)]


async def test_session_crud_and_errors(fakes, front_factory) -> None:  # noqa: F811
    await fakes("w1")
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(api_pb2.CreateSessionRequest(model="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(err.value.trailing_metadata())[ERROR_KEY] == "ModelNotFound"

        created = await stub.CreateSession(api_pb2.CreateSessionRequest(
            model="tiny", system_prompt="Be brief.", metadata={"user": "u1"},
            default_sampling=common_pb2.Sampling(temperature=0.5, max_tokens=7)))
        assert created.state_version == 0 and created.template == common_pb2.CHAT_TEMPLATE_CHAT
        got = await stub.GetSession(api_pb2.GetSessionRequest(session_id=created.session_id))
        assert got == created
        assert got.default_sampling.max_tokens == 7 and dict(got.metadata) == {"user": "u1"}

        others = [await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny")) for _ in range(4)]
        seen, token = [], ""
        while True:
            page = await stub.ListSessions(api_pb2.ListSessionsRequest(page_size=2, page_token=token))
            assert len(page.sessions) <= 2
            seen += [s.session_id for s in page.sessions]
            if not (token := page.next_page_token):
                break
        assert sorted(seen) == sorted([created.session_id] + [s.session_id for s in others])

        fork = await stub.ForkSession(api_pb2.ForkSessionRequest(session_id=created.session_id))
        assert fork.forked_from == created.session_id and fork.system_prompt == "Be brief."
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ForkSession(api_pb2.ForkSessionRequest(session_id=created.session_id,
                                                              expected_state_version=3))
        assert err.value.code() == grpc.StatusCode.ABORTED

        await stub.DeleteSession(api_pb2.DeleteSessionRequest(session_id=created.session_id))
        for call in (stub.GetSession(api_pb2.GetSessionRequest(session_id=created.session_id)),
                     stub.DeleteSession(api_pb2.DeleteSessionRequest(session_id=created.session_id))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(api_pb2.GetSessionRequest(session_id="bad id!"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(api_pb2.CreateSessionRequest(
                model="tiny", default_sampling=common_pb2.Sampling(top_p=1.5)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        models = await stub.ListModels(api_pb2.ListModelsRequest())
        assert [(m.id, m.workers, m.n_layer) for m in models.models] == [("tiny", 1, 2)]
        tokens = await stub.Tokenize(api_pb2.TokenizeRequest(model="tiny", text="ab cde"))
        assert list(tokens.token_ids) == [2, 3]


async def test_api_keys_separate_tenants(fakes, front_factory) -> None:  # noqa: F811
    await fakes("w1")
    _, target = await front_factory(api_key_hashes=[key_entry("alice", "key-a"), key_entry("bob", "key-b")])
    channel, stub = _stub(target)
    a = (("authorization", "Bearer key-a"),)
    b = (("x-api-key", "key-b"),)
    async with channel:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"), metadata=a)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetSession(api_pb2.GetSessionRequest(session_id=session.session_id), metadata=b)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # exactly like a missing session: no existence leak
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _chat(stub, _turn(session.session_id, "hi"), metadata=b)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert (await stub.ListSessions(api_pb2.ListSessionsRequest(), metadata=b)).sessions == []
        listed = await stub.ListSessions(api_pb2.ListSessionsRequest(), metadata=a)
        assert [s.session_id for s in listed.sessions] == [session.session_id]


async def test_chat_goes_to_the_rendezvous_home(fakes, front_factory, store) -> None:  # noqa: F811
    workers = {w: await fakes(w) for w in ("w1", "w2", "w3")}
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(
            model="tiny", default_sampling=common_pb2.Sampling(temperature=0.5, top_k=3)))
        infos = [_worker(w, fake.address, "tiny") for w, fake in workers.items()]
        home = rendezvous_order(session.session_id, infos)[0].worker_id
        for i in range(3):  # affinity: every turn on the same worker
            events = await _chat(stub, _turn(session.session_id, f"turn {i}", turn_id=f"t{i}", temperature=0.0))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "turn_start" and kinds[-1] == "turn_end" and set(kinds[1:-1]) == {"delta"}
            assert all(e.turn_id == f"t{i}" for e in events)
            assert events[0].turn_start.worker_id == home
            assert _text(events) == f"{home}: turn {i} "
            assert all(not e.delta.token_ids for e in events)  # the front asked for ids; the client did not
        request = workers[home].servicer.requests[-1]
        assert request.session_id == session.session_id and request.model == "tiny"
        # The turn's overrides only: the worker applies them over the session's stored defaults.
        assert request.sampling == common_pb2.Sampling(temperature=0.0)
        stored = await store.get_session(session.session_id)
        assert stored.sampling == {"temperature": 0.5, "top_k": 3}
        assert sum(len(f.servicer.requests) for f in workers.values()) == 3


async def test_failover_when_the_home_worker_is_down_or_overloaded(fakes, front_factory) -> None:  # noqa: F811
    workers = {w: await fakes(w) for w in ("w1", "w2", "w3")}
    _, target = await front_factory(busy_retry_s=0.3)
    channel, stub = _stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        infos = [_worker(w, fake.address, "tiny") for w, fake in workers.items()]
        first, second, third = (w.worker_id for w in rendezvous_order(session.session_id, infos))
        await workers[first].stop()  # crashed: still registered until its heartbeat expires
        events = await _chat(stub, _turn(session.session_id, "hello"))
        assert events[0].turn_start.worker_id == second and _text(events) == f"{second}: hello "
        workers[second].servicer.error = Overloaded("queue full", retry_after_s=0.5)
        events = await _chat(stub, _turn(session.session_id, "again"))
        assert events[0].turn_start.worker_id == third
        workers[third].servicer.error = Overloaded("queue full")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _chat(stub, _turn(session.session_id, "nobody"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(err.value.trailing_metadata())["retry-after-ms"] == "500"  # the soonest of the refusals
        # A session whose lease is held (another call runs a turn on it) is ABORTED at once, relayed as is
        # with its class name: one turn at a time, and no waiting behind a turn of unknown length.
        home = workers[second].servicer
        home.error, home.error_times = SessionBusy("busy"), -1
        before = len(home.requests)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _chat(stub, _turn(session.session_id, "x"))
        assert time.monotonic() - start < 0.2 and len(home.requests) - before == 1
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert dict(err.value.trailing_metadata())[ERROR_KEY] == "SessionBusy"
        # The one wait: the turn a stream sends right after cancelling one on the same session waits (up to
        # busy_retry_s) for the cancelled turn's lease, which the worker drops within one engine step.
        home.error, home.error_times = None, 0
        home.endless, home.delay_s = True, 0.01
        call = stub.Chat()
        await call.write(_turn(session.session_id, "long", turn_id="long"))
        await call.read()
        await call.write(api_pb2.ChatRequest(cancel=api_pb2.ChatCancel(turn_id="long")))
        while (event := await call.read()).WhichOneof("event") != "turn_end":
            pass
        home.endless, home.delay_s = False, 0.0
        home.error, home.error_times = SessionBusy("busy"), 2  # the lease is still going
        before = len(home.requests)
        await call.write(_turn(session.session_id, "next", turn_id="next"))
        await call.done_writing()
        rest = []
        while (event := await call.read()) is not grpc.aio.EOF:
            rest.append(event)
        assert rest[0].turn_start.worker_id == second and rest[-1].turn_end.stop_reason
        assert len(home.requests) - before == 3


async def test_cancel_message_stops_the_worker_turn_and_the_stream_goes_on(fakes, front_factory) -> None:  # noqa: F811
    fake = await fakes("w1")
    fake.servicer.endless, fake.servicer.delay_s = True, 0.01
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        call = stub.Chat()
        await call.write(_turn(session.session_id, "a b", turn_id="long"))
        events = []
        while len(events) < 4:
            events.append(await call.read())
        await call.write(api_pb2.ChatRequest(cancel=api_pb2.ChatCancel(turn_id="long")))
        while (event := await call.read()).WhichOneof("event") != "turn_end":
            events.append(event)
        assert event.turn_id == "long" and event.turn_end.stop_reason == common_pb2.STOP_REASON_CANCELLED
        assert event.turn_end.usage.prompt_tokens == 3
        assert event.turn_end.usage.generated_tokens == len(events) - 1  # counted from the worker's token ids
        assert event.turn_end.state_version == 0
        for _ in range(100):
            if fake.servicer.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fake.servicer.cancelled == 1 and fake.servicer.finished == 0
        fake.servicer.endless = False
        await call.write(_turn(session.session_id, "next", turn_id="t2"))
        # Cancelling a turn that waits behind the running one: it never reaches a worker.
        fake.servicer.delay_s = 0.05
        await call.write(_turn(session.session_id, "queued", turn_id="t3"))
        await call.write(api_pb2.ChatRequest(cancel=api_pb2.ChatCancel(turn_id="t3")))
        await call.done_writing()
        rest = []
        while (event := await call.read()) is not grpc.aio.EOF:
            rest.append(event)
        ends = [(e.turn_id, e.turn_end.stop_reason) for e in rest if e.WhichOneof("event") == "turn_end"]
        assert ends == [("t2", common_pb2.STOP_REASON_STOP_TOKEN), ("t3", common_pb2.STOP_REASON_CANCELLED)]
        assert [r.turn_id for r in fake.servicer.requests] == ["long", "t2"]


async def test_client_disconnect_cancels_the_worker_stream(fakes, front_factory) -> None:  # noqa: F811
    fake = await fakes("w1")
    fake.servicer.endless, fake.servicer.delay_s = True, 0.01
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        call = stub.Chat()
        await call.write(_turn(session.session_id, "go"))
        for _ in range(3):
            await call.read()
        call.cancel()
        gen = stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt="x"))
        for _ in range(3):
            await gen.read()
        gen.cancel()
    for _ in range(200):
        if fake.servicer.cancelled == 2:
            break
        await asyncio.sleep(0.01)
    assert fake.servicer.cancelled == 2 and fake.servicer.finished == 0


async def test_deadline_is_propagated_to_the_worker(fakes, front_factory) -> None:  # noqa: F811
    fake = await fakes("w1")
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        await _chat(stub, _turn(session.session_id, "hi"), timeout=5.0)
        remaining = fake.servicer.time_remaining[-1]
        assert remaining is not None and 3.0 < remaining < 5.1  # (gRPC rounds deadlines up a little)
        fake.servicer.endless, fake.servicer.delay_s = True, 0.05
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _chat(stub, _turn(session.session_id, "slow"), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 3.0
    for _ in range(100):
        if fake.servicer.cancelled:
            break
        await asyncio.sleep(0.02)
    assert fake.servicer.cancelled == 1  # the worker's turn ended with the caller's deadline


async def test_generate_stateless_goes_to_the_least_loaded_worker(fakes, front_factory) -> None:  # noqa: F811
    busy = await fakes("busy", active=4, queued=3)
    idle = await fakes("idle")
    _, target = await front_factory()
    channel, stub = _stub(target)
    async with channel:
        for _ in range(3):
            events = [e async for e in stub.Generate(api_pb2.GenerateRequest(
                model="tiny", prompt="p q", return_token_ids=True))]
            assert events[0].turn_start.worker_id == "idle"
            assert [list(e.delta.token_ids) for e in events[1:-1]] == [[1], [2], [3]]
        assert idle.servicer.requests[-1].session_id == "" and not busy.servicer.requests
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [e async for e in stub.Generate(api_pb2.GenerateRequest(model="other", session_id=session.session_id))]
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        [e async for e in stub.Generate(api_pb2.GenerateRequest(session_id=session.session_id, prompt="z",
                                                                ephemeral=True))]
        on_session = next(r for r in busy.servicer.requests + idle.servicer.requests if r.session_id)
        assert on_session.session_id == session.session_id and on_session.HasField("commit")
        assert not on_session.commit
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [e async for e in stub.Generate(api_pb2.GenerateRequest(model="ghost", prompt="z"))]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection(fakes, front_factory) -> None:  # noqa: F811
    server, target = await front_factory()
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="rwkv_serve.v1.RwkvService"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = [r async for r in reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        names = {s.name for s in responses[0].list_services_response.service}
        assert "rwkv_serve.v1.RwkvService" in names and "grpc.health.v1.Health" in names
        await server.health.enter_graceful_shutdown()
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
