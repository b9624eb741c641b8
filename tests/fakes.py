"""A scripted WorkerService for front and client tests: real gRPC, real registry entry, no model.

It answers a turn with the words of its input, prefixed by its id, one delta per word ("w1: hello world"
-> "w1:", "hello", "world"), so a test can see which worker ran a turn and what text it was sent."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import grpc

from common.errors import ServeError, abort
from common.store import StateStore
from common.worker_api import ModelDescription, WorkerLoad
from rwkv_serve.v1 import common_pb2, worker_pb2, worker_pb2_grpc


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Echoes turns word by word; can be told to fail, to be slow, and records what it was asked."""

    def __init__(self, worker_id: str, model: str = "tiny") -> None:
        self.worker_id = worker_id
        self.model = model
        self.requests: list[worker_pb2.RunTurnRequest] = []
        self.time_remaining: list[float | None] = []
        self.cancelled = 0
        self.finished = 0
        self.error: ServeError | None = None  # RunTurn fails with this before any event...
        self.error_times = -1  # ...this many times (-1: always)
        self.delay_s = 0.0  # before each delta
        self.endless = False  # keep producing deltas until max_tokens or cancellation (also: "endless" in the text)
        self.version = 0

    def words(self, request: worker_pb2.RunTurnRequest) -> list[str]:
        return [f"{self.worker_id}:", *request.text.split()]

    async def RunTurn(self, request: worker_pb2.RunTurnRequest, context: grpc.aio.ServicerContext):
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if self.error is not None and self.error_times != 0:
            self.error_times -= 1
            await abort(context, self.error)
        tid = request.turn_id
        words = self.words(request)
        yield common_pb2.ChatEvent(turn_id=tid, turn_start=common_pb2.TurnStart(
            prompt_tokens=len(words), worker_id=self.worker_id))
        endless = self.endless or "endless" in request.text
        limit = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 1_000_000
        try:
            i = 0
            while i < limit and (endless or i < len(words)):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                text = words[i % len(words)] + " "
                yield common_pb2.ChatEvent(turn_id=tid, delta=common_pb2.TextDelta(text=text, token_ids=[i + 1]))
                i += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        self.version += 1
        reason = common_pb2.STOP_REASON_MAX_TOKENS if i >= limit else common_pb2.STOP_REASON_STOP_TOKEN
        yield common_pb2.ChatEvent(turn_id=tid, turn_end=common_pb2.TurnEnd(
            stop_reason=reason, state_version=self.version,
            usage=common_pb2.Usage(prompt_tokens=len(words), generated_tokens=i, state_tokens=i)))

    async def GetLoad(self, request, context):
        return worker_pb2.LoadInfo(worker_id=self.worker_id, model=common_pb2.ModelInfo(id=self.model),
                                   capacity=4, serving=True)

    async def Tokenize(self, request, context):
        return worker_pb2.WorkerTokenizeResponse(token_ids=[len(w) for w in request.text.split()])


@dataclass
class RunningFake:
    """A FakeWorker served on a loopback port and registered in Redis."""

    servicer: FakeWorker
    server: grpc.aio.Server
    address: str
    store: StateStore
    record: WorkerLoad

    async def stop(self, unregister: bool = False) -> None:
        """Stops serving; by default the registry entry stays (as after a crash, until its TTL)."""
        await self.server.stop(None)
        if unregister:
            await self.store.unregister_worker(self.servicer.worker_id)

    async def register(self, **load: object) -> None:
        """Writes its registry record, with the given load fields changed (as a heartbeat would)."""
        self.record = replace(self.record, **load)
        await self.store.register_worker(self.record, 60_000)


async def start_fake(store: StateStore, worker_id: str, model: str = "tiny", **record: object) -> RunningFake:
    servicer = FakeWorker(worker_id, model)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    description = ModelDescription(model, n_layer=2, n_embd=128, n_head=2, vocab_size=65536)
    fake = RunningFake(servicer, server, address, store, replace(
        WorkerLoad(worker_id, address, description, capacity=4, max_queued=16), **record))
    await fake.register()
    return fake
