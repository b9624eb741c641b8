"""Stored responses of the Responses API, in Redis beside the sessions whose state versions they name.

  rwkv:resp:<response id>   JSON: tenant, session id, state version, the response's own metadata (TTL)
  rwkv:respidx:<session id>  set: the ids of the stored responses on that session (same TTL, refreshed)

A response is only metadata here: its state is the session's state at `state_version`, kept by the store of
sessions (the latest version, plus keep_versions earlier ones). Every key is one Redis key (no multi-key
command), so this works unchanged on Redis Cluster. Records are read only by their tenant: another tenant's id
is "not found", as with sessions.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from common.store.base import store_errors
from gateway.errors import GatewayError

_ID_RE = re.compile(r"^resp_[0-9a-f]{32}$")


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(16)


def not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"no response with id {response_id!r} is stored (never stored with store: true, "
                             "deleted, or expired)", param="response_id", code="response_not_found")


@store_errors  # Redis failures are StoreUnavailable, as in the store of sessions
class ResponseStore:
    """Put, get (by tenant), delete of response records; the per-session index of response ids."""

    def __init__(self, redis: Any, prefix: str = "rwkv", *, ttl_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_ms = max(1, round(ttl_s * 1000))

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    def _index(self, session_id: str) -> str:
        return f"{self.prefix}:respidx:{session_id}"

    async def put(self, record: dict[str, Any]) -> None:
        """Stores a record (its "id", "tenant" and "session_id" set) and indexes it under its session."""
        data = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key(record["id"]), data, px=self.ttl_ms)
            pipe.sadd(self._index(record["session_id"]), record["id"])
            pipe.pexpire(self._index(record["session_id"]), self.ttl_ms)
            await pipe.execute()

    async def get(self, response_id: str, tenant: str) -> dict[str, Any]:
        """The tenant's record of `response_id`; 404 when unknown, malformed, expired or another tenant's."""
        if not _ID_RE.match(response_id):
            raise not_found(response_id)
        data = await self.redis.get(self._key(response_id))
        if data is None:
            raise not_found(response_id)
        record = json.loads(data)
        if record.get("tenant") != tenant:
            raise not_found(response_id)
        return record

    async def delete(self, record: dict[str, Any]) -> int:
        """Deletes a record; returns how many stored responses its session still has."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._key(record["id"]))
            pipe.srem(self._index(record["session_id"]), record["id"])
            pipe.scard(self._index(record["session_id"]))
            _, _, left = await pipe.execute()
        return int(left)
