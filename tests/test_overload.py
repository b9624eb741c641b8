"""Overload: every queue is bounded and refuses at once with a retry hint; deadlines count the time spent queued;
a cancelled turn gives its place back within one engine step. Engine (stepped by hand), worker over gRPC, front."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from common.errors import RETRY_AFTER_KEY, DeadlineExceeded, Overloaded
from rwkv_serve.contract import sampling_to_pb
from rwkv_serve.v1 import api_pb2, api_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e_fixtures import fakes, front_factory  # noqa: F401  (fixtures)
from worker.engine import Delta, Engine, Finished, StopReason, TurnRequest
from worker.sampler import SamplingParams
from worker.server import WorkerCore, create_server, shutdown
from worker.settings import WorkerSettings

LONG = SamplingParams(temperature=0.0, stop_token_ids=(), max_tokens=1000)
SHORT = SamplingParams(temperature=0.0, stop_token_ids=(), max_tokens=4)


pytestmark = pytest.mark.usefixtures("one_thread")




def _step(engine: Engine, events: dict[int, list], n: int = 1) -> None:
    for _ in range(n):
        for turn, event in engine.step_sync():
            events.setdefault(turn.id, []).append(event)


# ---- the engine ------------------------------------------------------------------------------------------------


def test_a_turn_whose_deadline_passes_while_queued_is_dropped_unrun(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=1, max_queued=2)
    events: dict[int, list] = {}
    running = engine.submit(TurnRequest([1, 2, 3], LONG))
    _step(engine, events, 2)
    waiting = engine.submit(TurnRequest([4, 5], SHORT, deadline=time.monotonic() + 0.05))
    _step(engine, events)
    assert engine.load.queued == 1 and waiting.id not in events  # still waiting: the one slot is taken
    time.sleep(0.08)
    _step(engine, events)
    (dropped,) = events[waiting.id]  # its only event: never admitted, never fed
    assert isinstance(dropped, DeadlineExceeded)
    assert engine.load.queued == 0 and engine.load.active == 1
    assert isinstance(events[running.id][-1], Delta)  # the running turn goes on
    with pytest.raises(DeadlineExceeded):  # already expired: refused at the door
        engine.submit(TurnRequest([4], SHORT, deadline=time.monotonic() - 1))


def test_a_cancelled_queued_turn_frees_its_place_within_one_step(tiny_model, tokenizer) -> None:
    engine = Engine(tiny_model, tokenizer, max_batch=1, max_queued=1)
    events: dict[int, list] = {}
    engine.submit(TurnRequest([1, 2, 3], LONG))
    _step(engine, events)
    queued = engine.submit(TurnRequest([4, 5], SHORT))
    with pytest.raises(Overloaded) as refused:  # batch and queue are full: refused at once, with a hint
        engine.submit(TurnRequest([6], SHORT))
    assert refused.value.retry_after_s > 0
    for _ in range(100):  # a bounded queue: however often they come, nothing more is held
        with pytest.raises(Overloaded):
            engine.submit(TurnRequest([6], SHORT))
    assert engine.load.queued == 1
    queued.cancel()
    _step(engine, events)
    (finished,) = events[queued.id]
    assert isinstance(finished, Finished) and finished.reason is StopReason.CANCELLED and finished.generated_tokens == 0
    assert engine.load.queued == 0
    engine.submit(TurnRequest([6], SHORT))  # its place is free again


# ---- the worker over gRPC ---------------------------------------------------------------------------------------


@pytest.fixture
async def worker(redis_url, store, tiny_model,
                 tokenizer) -> AsyncIterator[tuple[WorkerCore, worker_pb2_grpc.WorkerServiceStub]]:
    settings = WorkerSettings(redis_url=redis_url, port=0, model_id="tiny", max_batch=1, max_queued=2,
                              heartbeat_s=0.2, lease_ms=3_000, drain_s=2, grace_s=0.5)
    core = WorkerCore(settings, tiny_model, tokenizer, "tiny")
    server, port = create_server(settings, core)
    await server.start()
    await core.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield core, worker_pb2_grpc.WorkerServiceStub(channel)
    finally:
        await channel.close()
        await shutdown(server, core, settings)


def _raw(text: str, max_tokens: int) -> worker_pb2.RunTurnRequest:
    sampling = sampling_to_pb({"temperature": 0.0, "stop_token_ids": [], "max_tokens": max_tokens})
    return worker_pb2.RunTurnRequest(kind=worker_pb2.INPUT_KIND_RAW, text=text, sampling=sampling)


async def test_worker_deadline_counts_the_time_queued(worker, store) -> None:
    core, stub = worker
    sid = (await store.create_session(tenant="t", model="tiny", template="raw", ttl_ms=60_000)).session_id
    hog = stub.RunTurn(_raw("hog", 4000))
    await hog.read()
    queued = _raw("queued", 2)
    queued.session_id = sid
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.RunTurn(queued, timeout=0.4):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 2
    lease = store.keys.session(sid, "lease")
    for _ in range(200):  # dropped at the next step boundary, never admitted; the handler lets the lease go
        if core.engine.load.queued == 0 and not await store.redis.exists(lease):
            break
        await asyncio.sleep(0.005)
    assert core.engine.load.queued == 0 and core.engine.load.active == 1  # the hog runs on
    assert (await store.get_session(sid)).version == 0 and not await store.redis.exists(lease)
    hog.cancel()
    assert await core.engine.drain(2)


async def test_worker_cancelled_queued_turn_frees_its_place(worker) -> None:
    core, stub = worker
    hog = stub.RunTurn(_raw("hog", 4000))
    await hog.read()
    queued = [stub.RunTurn(_raw(f"q{i}", 2)) for i in range(2)]
    for call in queued:
        await call.read()  # turn_start: queued in the engine
    assert core.engine.load.queued == 2
    refused_at = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.RunTurn(_raw("one too many", 2)):
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - refused_at < 1
    assert int(dict(info.value.trailing_metadata())[RETRY_AFTER_KEY]) > 0
    queued[0].cancel()
    for _ in range(200):
        if core.engine.load.queued == 1:
            break
        await asyncio.sleep(0.005)
    assert core.engine.load.queued == 1 and core.engine.load.active == 1  # its place is free; the hog runs on
    call = stub.RunTurn(_raw("now it fits", 2))
    assert (await call.read()).HasField("turn_start")
    for c in (hog, queued[1], call):
        c.cancel()
    assert await core.engine.drain(2)


# ---- the front (scripted workers) ----------------------------------------------------------------------------


def _front_stub(target: str) -> tuple[grpc.aio.Channel, api_pb2_grpc.RwkvServiceStub]:
    channel = grpc.aio.insecure_channel(target)
    return channel, api_pb2_grpc.RwkvServiceStub(channel)


def _chat_turn(sid: str, text: str, turn_id: str = "t") -> api_pb2.ChatRequest:
    return api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=sid, text=text, turn_id=turn_id))


async def test_front_refuses_past_its_in_flight_bound_at_once(fakes, front_factory) -> None:  # noqa: F811
    fake = await fakes("w1")
    fake.servicer.endless, fake.servicer.delay_s = True, 0.01
    _, target = await front_factory(max_inflight_turns=2, overload_retry_after_s=0.25)
    channel, stub = _front_stub(target)
    async with channel:
        running = [stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt=f"p{i}")) for i in range(2)]
        for call in running:
            await call.read()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt="third")):
                pass
        assert time.monotonic() - started < 0.5  # at once, not queued
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(info.value.trailing_metadata())[RETRY_AFTER_KEY] == "250"
        assert len(fake.servicer.requests) == 2  # it never reached the worker
        running[0].cancel()
        for _ in range(100):  # the cancelled call's place comes back
            if fake.servicer.cancelled:
                break
            await asyncio.sleep(0.01)
        call = stub.Generate(api_pb2.GenerateRequest(model="tiny", prompt="fits"))
        assert (await call.read()).HasField("turn_start")
        for c in (running[1], call):
            c.cancel()


async def test_front_per_worker_bound_moves_turns_on_then_refuses(fakes, front_factory) -> None:  # noqa: F811
    workers = {w: await fakes(w) for w in ("w1", "w2")}
    for fake in workers.values():
        fake.servicer.endless, fake.servicer.delay_s = True, 0.01
    _, target = await front_factory(max_inflight_per_worker=1)
    channel, stub = _front_stub(target)
    async with channel:
        sessions = [await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny")) for _ in range(3)]
        calls = [stub.Chat(iter([_chat_turn(s.session_id, "go")])) for s in sessions[:2]]
        homes = {(await call.read()).turn_start.worker_id for call in calls}
        assert homes == {"w1", "w2"}  # the second went to the other worker whatever its home
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Chat(iter([_chat_turn(sessions[2].session_id, "no room")])):
                pass
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(info.value.trailing_metadata())[RETRY_AFTER_KEY]) > 0
        assert sum(len(f.servicer.requests) for f in workers.values()) == 2
        for call in calls:
            call.cancel()


async def test_chat_stream_holds_a_bounded_queue_of_turns(fakes, front_factory) -> None:  # noqa: F811
    fake = await fakes("w1")
    fake.servicer.endless, fake.servicer.delay_s = True, 0.01
    _, target = await front_factory(max_stream_queue=2)
    channel, stub = _front_stub(target)
    async with channel:
        session = await stub.CreateSession(api_pb2.CreateSessionRequest(model="tiny"))
        call = stub.Chat()
        await call.write(_chat_turn(session.session_id, "running", "t0"))
        await call.read()
        for i in range(1, 4):  # two wait; the third is one too many
            await call.write(_chat_turn(session.session_id, "waiting", f"t{i}"))
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (event := await call.read()) is not grpc.aio.EOF:
                events.append(event)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 turns" in info.value.details()
        assert [r.turn_id for r in fake.servicer.requests] == ["t0"]  # the waiting turns never ran
        for _ in range(100):
            if fake.servicer.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fake.servicer.cancelled == 1  # the running turn was stopped with the stream
