"""The front's gRPC server: thin servicers over service.front.Front, health, reflection, SIGTERM drain."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2

from common.errors import InvalidArgument, grpc_errors
from common.lifecycle import add_health_and_reflection, bind, freeze_startup_heap, run_server, wait_for_stop_signal
from common.store import redact_url
from common.telemetry import Telemetry, configure_logging
from rwkv_serve.v1 import api_pb2, api_pb2_grpc, common_pb2
from service.convert import preset_to_pb, session_to_pb
from service.front import Front, max_message_bytes
from service.settings import FrontSettings
from service.wire import add_servicer

log = logging.getLogger("rwkv.front")
SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["RwkvService"].full_name


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on this process's monotonic clock (propagated to the worker call)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _ttl_ms(message: object, field: str = "ttl") -> int | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    ttl = getattr(message, field)
    if ttl.seconds < 0 or ttl.nanos < 0:
        raise InvalidArgument("ttl must be positive")
    return ttl.ToMilliseconds()


class RwkvServicer(api_pb2_grpc.RwkvServiceServicer):
    """The public API: decode, one domain call, encode."""

    def __init__(self, front: Front) -> None:
        self.front = front

    async def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return await self.front.auth.tenant(context.invocation_metadata())

    @grpc_errors
    async def CreateSession(self, request: api_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext):
        meta = await self.front.sessions.create(
            await self._tenant(context), model=request.model, template=request.template,
            system_prompt=request.system_prompt, preset=request.preset, sampling=request.default_sampling,
            ttl_ms=_ttl_ms(request), metadata=dict(request.metadata), keep_versions=request.keep_versions)
        return session_to_pb(meta)

    @grpc_errors
    async def GetSession(self, request: api_pb2.GetSessionRequest, context: grpc.aio.ServicerContext):
        return session_to_pb(await self.front.sessions.get(await self._tenant(context), request.session_id))

    @grpc_errors
    async def ListSessions(self, request: api_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext):
        metas, token = await self.front.sessions.list(
            await self._tenant(context), page_size=request.page_size, page_token=request.page_token,
            model=request.model)
        return api_pb2.ListSessionsResponse(sessions=[session_to_pb(m) for m in metas], next_page_token=token)

    @grpc_errors
    async def DeleteSession(self, request: api_pb2.DeleteSessionRequest, context: grpc.aio.ServicerContext):
        await self.front.sessions.delete(await self._tenant(context), request.session_id)
        return api_pb2.DeleteSessionResponse()

    @grpc_errors
    async def ForkSession(self, request: api_pb2.ForkSessionRequest, context: grpc.aio.ServicerContext):
        meta = await self.front.sessions.fork(
            await self._tenant(context), request.session_id, ttl_ms=_ttl_ms(request), metadata=dict(request.metadata),
            sampling=request.default_sampling if request.HasField("default_sampling") else None,
            expected_version=request.expected_state_version if request.HasField("expected_state_version") else None,
            state_version=request.state_version if request.HasField("state_version") else None)
        return session_to_pb(meta)

    @grpc_errors
    async def Chat(self, request_iterator: AsyncIterator[api_pb2.ChatRequest],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.ChatEvent]:
        async for event in self.front.turns.chat(await self._tenant(context), request_iterator, _deadline(context)):
            yield event

    @grpc_errors
    async def Generate(self, request: api_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.ChatEvent]:
        async for event in self.front.turns.generate(await self._tenant(context), request, _deadline(context)):
            yield event

    @grpc_errors
    async def ListModels(self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        await self._tenant(context)
        return api_pb2.ListModelsResponse(models=await self.front.list_models())

    @grpc_errors
    async def Tokenize(self, request: api_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        await self._tenant(context)
        token_ids = await self.front.tokenize(request.model, request.text, _deadline(context))
        return api_pb2.TokenizeResponse(token_ids=token_ids)

    @grpc_errors
    async def RegisterPreset(self, request: api_pb2.RegisterPresetRequest, context: grpc.aio.ServicerContext):
        source = request.WhichOneof("source") or ""
        info = await self.front.presets.register(
            await self._tenant(context), model=request.model, name=request.name, source=source,
            data=getattr(request, source) if source else b"", description=request.description,
            replace=request.replace, deadline=_deadline(context))
        return preset_to_pb(info)

    @grpc_errors
    async def ListPresets(self, request: api_pb2.ListPresetsRequest, context: grpc.aio.ServicerContext):
        await self._tenant(context)
        presets = await self.front.presets.list(request.model)
        return api_pb2.ListPresetsResponse(presets=[preset_to_pb(p) for p in presets])

    @grpc_errors
    async def DeletePreset(self, request: api_pb2.DeletePresetRequest, context: grpc.aio.ServicerContext):
        await self.front.presets.delete(await self._tenant(context), request.model, request.name)
        return api_pb2.DeletePresetResponse()


class FrontServer:
    """A started-or-not front: the grpc.aio server, its Front and its health servicer."""

    def __init__(self, server: grpc.aio.Server, front: Front, health_servicer: health.aio.HealthServicer,
                 port: int) -> None:
        self.server, self.front, self.health, self.port = server, front, health_servicer, port

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Drains: health says NOT_SERVING and new turns are refused (UNAVAILABLE: retry on another front) while
        the turns in flight get up to `grace` seconds (None: as long as they take) to finish and commit; then the
        server stops, closing what is left (idle Chat streams, calls past the grace period)."""
        await self.health.enter_graceful_shutdown()
        admission = self.front.admission
        admission.close()
        if grace is None or grace > 0:
            if not await admission.drained(grace):
                log.warning("%d turns still running after %.1fs of draining; stopping them", admission.total, grace)
        await self.server.stop(0 if grace == 0 else 0.5)
        await self.front.close()


def create_server(settings: FrontSettings, front: Front | None = None) -> tuple[FrontServer, int]:
    """Builds (but does not start) the front's server; returns it and the bound port."""
    front = front or Front.from_settings(settings)
    message_bytes = max_message_bytes(settings)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", message_bytes),
                                      ("grpc.max_send_message_length", message_bytes),
                                      ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
                             interceptors=front.telemetry.server_interceptors() or None)
    add_servicer(api_pb2_grpc.add_RwkvServiceServicer_to_server, RwkvServicer(front), server)  # (service/wire.py)
    health_servicer = add_health_and_reflection(server, SERVICE_NAME)
    port = bind(server, settings.host, settings.port, tls_cert=settings.tls_cert, tls_key=settings.tls_key,
                tls_client_ca=settings.tls_client_ca)
    return FrontServer(server, front, health_servicer, port), port


async def serve(settings: FrontSettings) -> None:
    """Runs the front until SIGTERM/SIGINT, then drains."""
    telemetry = Telemetry.from_settings(settings, "rwkv-front")
    front_server, port = create_server(settings, Front.from_settings(settings, telemetry))
    await front_server.front.store.verify()  # a wrong Redis password stops the start with a clear message
    await front_server.start()
    freeze_startup_heap()
    log.info("front listening on %s:%d (%s; redis %s)", settings.host, port,
             "TLS" + (", client certificates required" if settings.tls_client_ca else "") if settings.tls_cert
             else "plaintext", redact_url(settings.redis_url))
    log.log(logging.INFO if front_server.front.auth.enabled else logging.WARNING, "%s",
            front_server.front.auth.describe())
    print(f"rwkv-front listening on {settings.host}:{port}", flush=True)
    await wait_for_stop_signal()
    log.info("draining (grace %.1fs)", settings.grace_s)
    await front_server.stop(settings.grace_s)
    telemetry.shutdown()


def main() -> None:
    """Console script `rwkv-front`: settings from RWKV_FRONT_* (and REDIS_URL), then serve."""
    import argparse

    parser = argparse.ArgumentParser(prog="rwkv-front", description="rwkv-serve front (public gRPC API)")
    parser.add_argument("--host", help="bind address (RWKV_FRONT_HOST)")
    parser.add_argument("--port", type=int, help="port, 0 = any free one (RWKV_FRONT_PORT)")
    parser.add_argument("--redis-url", help="Redis URL (RWKV_FRONT_REDIS_URL or REDIS_URL)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("redis_url", args.redis_url))
                 if v is not None}
    settings = FrontSettings(**overrides)
    configure_logging(args.log_level, settings.log_format)
    run_server(serve(settings), parser)


if __name__ == "__main__":
    main()
