"""Fixtures of the front, client and end-to-end tests (imported by those modules; conftest.py has the Redis one)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from service.server import FrontServer, create_server
from service.settings import FrontSettings
from tests.fakes import RunningFake, start_fake


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
