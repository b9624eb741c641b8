"""What the gateway tests share: a real worker (tiny model) and front, and the gateway on uvicorn, each on a loopback
port, served by event loops in threads of this process; the official openai SDK drives the gateway over HTTP.
(No tests here: tests/test_gateway*.py import these.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis

from gateway.server import create_server
from gateway.settings import GatewaySettings
from tests.e2e_fixtures import InprocService

MODEL = "tiny"
GATEWAY_DB = 5  # a database of its own: other tests flush db 0


class Gateway:
    """The gateway on a free port, its uvicorn server on an event loop in a thread."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self._thread.start()
        self.server, sock = create_server(settings)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._serving = asyncio.run_coroutine_threadsafe(self.server.serve(sockets=[sock]), self.loop)
        deadline = time.monotonic() + 20
        while not self.server.started:
            if self._serving.done():
                self._serving.result()  # raises the start-up error
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        try:
            self._serving.result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def db_url(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + f"/{GATEWAY_DB}"


def start_service(redis_url: str, model: Any, tokenizer: Any, *, front: dict[str, Any] | None = None,
                  worker: dict[str, Any] | None = None) -> InprocService:
    url = db_url(redis_url)
    redis.Redis.from_url(url).flushdb()
    return InprocService(url, model, tokenizer, front={"discovery_interval_s": 0.2, **(front or {})},
                         worker={"max_batch": 8, "max_queued": 16, **(worker or {})})


def start_gateway(service: InprocService, **overrides: Any) -> Gateway:
    settings = GatewaySettings(**{"host": "127.0.0.1", "port": 0, "front_target": service.target,
                                  "redis_url": service.redis_url, "auth_mode": "dev", "turn_retries": 0,
                                  **overrides})
    return Gateway(settings)


def worker_busy(service: InprocService) -> int:
    """Turns the worker is running or has queued (its engine's own counters)."""
    load = service.core.engine.load
    return load.active + load.queued


# Fixtures of the modules that share one service and one gateway (they import these three by name).
@pytest.fixture(scope="module")
def service(redis_url, tiny_model, tokenizer, one_thread) -> Iterator[InprocService]:
    service = start_service(redis_url, tiny_model, tokenizer)
    yield service
    service.close()


@pytest.fixture(scope="module")
def gateway(service: InprocService) -> Iterator[Gateway]:
    gateway = start_gateway(service)
    yield gateway
    gateway.close()


@pytest.fixture
def oai(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url, api_key="unused-in-dev-mode", max_retries=0) as client:
        yield client
