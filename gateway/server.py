"""`rwkv-gateway`: the OpenAI-compatible HTTP API (uvicorn) in front of the gRPC front. SIGTERM stops it
after the requests in flight (uvicorn's graceful shutdown)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

import uvicorn

from common.lifecycle import freeze_startup_heap
from common.store import StoreConfigError, redact_url
from common.telemetry import configure_logging
from gateway.app import create_app
from gateway.settings import GatewaySettings

log = logging.getLogger("rwkv.gateway")


def create_server(settings: GatewaySettings, store: object = None) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for the settings and its bound socket (port 0 picks a free port: read it from the socket).
    Serve with `await server.serve(sockets=[sock])`."""
    config = uvicorn.Config(create_app(settings, store), log_config=None, access_log=False, lifespan="on",
                            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
                            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
                            timeout_graceful_shutdown=round(settings.grace_s))
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return uvicorn.Server(config), sock


async def serve(settings: GatewaySettings) -> None:
    store = settings.open_store()
    await store.verify()  # a Redis that cannot work stops the start with one line (StoreConfigError)
    server, sock = create_server(settings, store)
    freeze_startup_heap()
    scheme = "https" if settings.tls_cert else "http"
    log.info("gateway listening on %s://%s:%d, front %s, Redis %s", scheme, settings.host, sock.getsockname()[1],
             settings.front_target, redact_url(settings.redis_url))
    if settings.auth_mode == "dev":
        log.warning("auth_mode=dev: every caller of the gateway is tenant %r (stored responses are shared); "
                    "do not expose this port", settings.default_tenant)
    try:
        await server.serve(sockets=[sock])
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rwkv-gateway", description="OpenAI-compatible HTTP API of rwkv-serve "
                                     "(every setting is also RWKV_GATEWAY_<NAME> in the environment)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--front", dest="front_target", help="the gRPC front, host:port")
    args = parser.parse_args(argv)
    settings = GatewaySettings(**{k: v for k, v in vars(args).items() if v is not None})
    configure_logging("INFO", settings.log_format)
    try:
        asyncio.run(serve(settings))
    except StoreConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
