"""The WorkerService servicer: decode the protobuf, await one domain call, encode (no torch, no redis here)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from common.errors import ModelNotFound, Unavailable, grpc_errors
from common.worker_api import PreparedState, TurnEvent, TurnInput, WorkerLoad
from rwkv_serve.v1 import common_pb2, worker_pb2, worker_pb2_grpc


class Runner(Protocol):
    """What the servicer needs from worker.runner.TurnRunner."""

    def run(self, turn: TurnInput, deadline: float | None = None) -> AsyncIterator[TurnEvent]: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def prepare_state(self, source: str, data: bytes) -> PreparedState: ...


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """One model's engine behind gRPC."""

    def __init__(self, runner: Runner, load: Callable[[], WorkerLoad]) -> None:
        self.runner = runner
        self.load = load

    @grpc_errors
    async def RunTurn(
        self, request: worker_pb2.RunTurnRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ChatEvent]:
        if not self.load().serving:
            raise Unavailable("worker is draining")
        turn = TurnInput.from_pb(request)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        # A client cancel cancels this handler's task; the runner then cancels the engine turn and
        # releases the session's lease.
        async for event in self.runner.run(turn, deadline):
            yield event.to_pb(turn.turn_id, turn.return_token_ids)

    @grpc_errors
    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadInfo:
        return self.load().to_pb()

    @grpc_errors
    async def Tokenize(
        self, request: worker_pb2.WorkerTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerTokenizeResponse:
        return worker_pb2.WorkerTokenizeResponse(token_ids=await self.runner.tokenize(request.text))

    @grpc_errors
    async def PrepareState(
        self, request: worker_pb2.PrepareStateRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrepareStateResponse:
        served = self.load().model.id
        if request.model and request.model != served:
            raise ModelNotFound(f"this worker serves {served!r}, not {request.model!r}")
        source = request.WhichOneof("source") or ""
        prepared = await self.runner.prepare_state(source, getattr(request, source) if source else b"")
        return prepared.to_pb()
