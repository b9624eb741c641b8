"""Fixtures of the front, client and end-to-end tests (imported by those modules; conftest.py has the Redis one)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from service.server import FrontServer, create_server
from service.settings import FrontSettings
from tests.fakes import RunningFake, start_fake


@contextlib.asynccontextmanager
async def turn_runner(store: Any, model: Any, tokenizer: Any, *, max_batch: int = 4, model_id: str = "tiny",
                      worker_id: str = "w-test", **config: Any) -> AsyncIterator[Any]:
    """A worker's turn runner (its own engine and local cache) on `store`, without gRPC; the engine closes on
    exit. `config`: RunnerConfig fields."""
    from worker.engine import Engine
    from worker.runner import RunnerConfig, TurnRunner
    from worker.state_cache import StateCache

    engine = Engine(model, tokenizer, max_batch=max_batch)
    engine.start()
    try:
        yield TurnRunner(engine, store, tokenizer, RunnerConfig(model_id, worker_id, **config), StateCache(1 << 26))
    finally:
        await engine.close()


@pytest.fixture
async def front_factory(redis_url: str, store: Any) -> AsyncIterator[Callable[..., Awaitable[tuple[FrontServer, str]]]]:
    """Starts fronts on loopback port 0 against the test Redis (emptied by `store`); yields their "host:port"."""
    started: list[FrontServer] = []

    async def start(**overrides: Any) -> tuple[FrontServer, str]:
        # No keys given: the dev mode (every caller is the default tenant), as on the one-machine stack.
        auth_mode = "keys" if "api_key_hashes" in overrides or "api_keys_file" in overrides else "dev"
        settings = FrontSettings(host="127.0.0.1", port=0, redis_url=redis_url,
                                 **{"discovery_interval_s": 0.0, "suspect_s": 5.0, "auth_mode": auth_mode,
                                    **overrides})
        server, port = create_server(settings)
        await server.start()
        started.append(server)
        return server, f"127.0.0.1:{port}"

    yield start
    for server in started:
        await server.stop(0)


def key_entry(tenant: str, key: str) -> str:
    """A front's api_key_hashes entry for `key` (what `python -m service.admin keys create --no-store` prints)."""
    from service.auth import hash_api_key

    return f"{tenant}:{hash_api_key(key)}"


@pytest.fixture
async def fakes(store: Any) -> AsyncIterator[Callable[..., Awaitable[RunningFake]]]:
    """Starts scripted workers (tests/fakes.py) registered in the test Redis."""
    started: list[RunningFake] = []

    async def start(worker_id: str, model: str = "tiny", **record: Any) -> RunningFake:
        fake = await start_fake(store, worker_id, model, **record)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.server.stop(None)


@contextlib.contextmanager
def inproc_service(redis_url: str, db: int, model: Any, tokenizer: Any, **kwargs: Any) -> Iterator[InprocService]:
    """An InprocService on database `db` of the test Redis, flushed first (a module's own database: others flush
    theirs between tests); closed on exit. `kwargs`: InprocService's worker= / front= settings."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    service = InprocService(url, model, tokenizer, **kwargs)
    try:
        yield service
    finally:
        service.close()


class InprocService:
    """A real front and a real worker (the tiny model) on loopback ports, served by an event loop in a thread of
    this process: cheap to start, driven from plain (sync) tests and hypothesis through real gRPC."""

    def __init__(self, redis_url: str, model: Any, tokenizer: Any, *, worker: dict[str, Any] | None = None,
                 front: dict[str, Any] | None = None) -> None:
        import asyncio
        import threading

        from worker.server import WorkerCore
        from worker.server import create_server as create_worker_server
        from worker.settings import WorkerSettings

        self.redis_url = redis_url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inproc-service", daemon=True)
        self._thread.start()
        worker_settings = WorkerSettings(**{"redis_url": redis_url, "port": 0, "model_id": "tiny", "max_batch": 4,
                                            "max_queued": 8, "heartbeat_s": 0.5, "lease_ms": 3_000, "drain_s": 2,
                                            "grace_s": 0.5, **(worker or {})})
        front_settings = FrontSettings(**{"host": "127.0.0.1", "port": 0, "redis_url": redis_url, "auth_mode": "dev",
                                          "discovery_interval_s": 0.0, **(front or {})})

        async def start() -> tuple[Any, Any, FrontServer, int]:
            core = WorkerCore(worker_settings, model, tokenizer, worker_settings.model_id)
            worker_server, _ = create_worker_server(worker_settings, core)
            await worker_server.start()
            await core.start()
            front_server, port = create_server(front_settings)
            await front_server.start()
            return core, worker_server, front_server, port

        self.core, self._worker_server, self.front, port = self.run(start())
        self.worker_settings = worker_settings
        self.target = f"127.0.0.1:{port}"

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Runs a coroutine on the service's loop and returns its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        from worker.server import shutdown

        async def stop() -> None:
            await self.front.stop(0)
            await shutdown(self._worker_server, self.core, self.worker_settings)

        try:
            self.run(stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
