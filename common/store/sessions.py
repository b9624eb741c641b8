"""Sessions: their metadata hash, the per-tenant index behind ListSessions, deletion and server-side forks."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from common.errors import InvalidArgument, SessionNotFound, StateCorrupt, VersionConflict
from common.store.base import StoreBase, check_name, check_session_id, now_ms, store_errors


def new_session_id(fork_of: str | None = None) -> str:
    """A fresh root id, or a fork id in the same hash-tag family as fork_of.

    Both carry 128 random bits of their own (a fork's suffix too: knowing a root id must not let anyone guess
    its forks), so an id cannot be guessed; tenancy is still checked on every call."""
    if fork_of is None:
        return secrets.token_urlsafe(16)
    return f"{fork_of.split('.', 1)[0]}.{secrets.token_urlsafe(16)}"


@dataclass(frozen=True)
class SessionMeta:
    """A session's metadata as stored in its meta hash."""

    session_id: str
    tenant: str
    model: str
    template: str  # "chat", "one-state" or "raw"
    version: int  # of the stored state: 0 = no turn committed yet (the state is built from preset/system prompt)
    created_ms: int
    updated_ms: int
    ttl_ms: int  # idle time to live, refreshed on use
    system_prompt: str = ""
    preset: str = ""
    forked_from: str = ""
    state_tokens: int = 0  # tokens the state has consumed
    turns: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)  # the session's default sampling, as set fields
    keep_versions: int = 0  # earlier state versions kept besides the current one (ForkSession.state_version)

    def to_hash(self) -> dict[str, str]:
        return {
            "tenant": self.tenant,
            "model": self.model,
            "template": self.template,
            "version": str(self.version),
            "created": str(self.created_ms),
            "updated": str(self.updated_ms),
            "ttl": str(self.ttl_ms),
            "system_prompt": self.system_prompt,
            "preset": self.preset,
            "forked_from": self.forked_from,
            "tokens": str(self.state_tokens),
            "turns": str(self.turns),
            "metadata": json.dumps(self.metadata, sort_keys=True),
            "sampling": json.dumps(self.sampling, sort_keys=True),
            "keep": str(self.keep_versions),
        }

    @classmethod
    def from_hash(cls, session_id: str, raw: Mapping[bytes, bytes]) -> SessionMeta:
        """Parses a meta hash; StateCorrupt when a field does not parse (something else wrote the key)."""
        try:
            h = {k.decode(): v.decode() for k, v in raw.items()}
            return cls(
                session_id=session_id,
                tenant=h["tenant"],
                model=h["model"],
                template=h["template"],
                version=int(h["version"]),
                created_ms=int(h["created"]),
                updated_ms=int(h["updated"]),
                ttl_ms=int(h["ttl"]),
                system_prompt=h.get("system_prompt", ""),
                preset=h.get("preset", ""),
                forked_from=h.get("forked_from", ""),
                state_tokens=int(h.get("tokens", 0)),
                turns=int(h.get("turns", 0)),
                metadata=json.loads(h.get("metadata") or "{}"),
                sampling=json.loads(h.get("sampling") or "{}"),
                keep_versions=int(h.get("keep", 0)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"session {session_id} has unreadable metadata ({exc!r})") from None


# KEYS: source meta, source state, fork meta, fork state, source kept hash, source kept state (of state_version).
# ARGV: expected version or '', now ms, state version or '' (the current one), then field/value pairs that override
# the copied meta. A kept earlier version is copied from its own key (COPY, inside the slot), with its token and
# turn counts; version 0 needs no bytes (the first turn builds it). Returns {version} or {-2} (no source) /
# {-3, version} (not the expected version) / {-4, version, keep} (evicted) / {-5, version} (no such version yet).
_FORK = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {-2} end
version = tonumber(version)
if ARGV[1] ~= '' and version ~= tonumber(ARGV[1]) then return {-3, version} end
local source, at, counts = KEYS[2], version, nil
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= version then
  at = tonumber(ARGV[3])
  local keep = tonumber(redis.call('HGET', KEYS[1], 'keep') or '0')
  if at > version or at < 0 then return {-5, version} end
  if version - at > keep then return {-4, version, keep} end
  if at == 0 then
    source, counts = nil, {'0', '0'}
  else
    local info = redis.call('HGET', KEYS[5], at)
    if not info or redis.call('EXISTS', KEYS[6]) == 0 then return {-4, version, keep} end
    source = KEYS[6]
    counts = {string.match(info, '(%d+) (%d+)')}
  end
end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('HSET', KEYS[3], 'created', ARGV[2], 'updated', ARGV[2])
if counts then redis.call('HSET', KEYS[3], 'version', at, 'tokens', counts[1], 'turns', counts[2]) end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
local ttl = redis.call('HGET', KEYS[3], 'ttl')
if source and redis.call('EXISTS', source) == 1 then
  redis.call('COPY', source, KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ttl)
end
redis.call('PEXPIRE', KEYS[3], ttl)
return {at}
"""


def _index_member(meta: SessionMeta) -> str:
    return f"{meta.created_ms:015d}:{meta.session_id}"  # ordered by creation, unique


@store_errors
class Sessions(StoreBase):
    """Create, read, list, fork and delete sessions (the turn protocol that changes their state is in turns.py)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "rwkv") -> None:
        super().__init__(client, prefix)
        self._fork = client.register_script(_FORK)

    async def create_session(
        self,
        *,
        tenant: str,
        model: str,
        template: str,
        ttl_ms: int,
        system_prompt: str = "",
        preset: str = "",
        metadata: Mapping[str, str] | None = None,
        sampling: Mapping[str, Any] | None = None,
        keep_versions: int = 0,
    ) -> SessionMeta:
        """Stores a new session at version 0 (no state yet: the first turn builds it); `keep_versions` earlier
        states are kept as turns commit (turns.py), for fork_session(state_version=...)."""
        if ttl_ms <= 0:
            raise InvalidArgument("ttl must be positive")
        if keep_versions < 0:
            raise InvalidArgument("keep_versions must not be negative")
        check_name("model", model)
        if preset:
            check_name("preset", preset)
        now = now_ms()
        meta = SessionMeta(
            session_id=new_session_id(), tenant=tenant, model=model, template=template, version=0,
            created_ms=now, updated_ms=now, ttl_ms=ttl_ms, system_prompt=system_prompt, preset=preset,
            metadata=dict(metadata or {}), sampling=dict(sampling or {}), keep_versions=keep_versions,
        )
        meta_key = self.keys.session(meta.session_id, "meta")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta_key, mapping=meta.to_hash())
            pipe.pexpire(meta_key, ttl_ms)
            await pipe.execute()
        await self.redis.zadd(self.keys.tenant_index(meta.tenant), {_index_member(meta): 0})
        return meta

    async def get_session(self, sid: str) -> SessionMeta:
        """The session's metadata; SessionNotFound when unknown or expired."""
        raw = await self.redis.hgetall(self.keys.session(sid, "meta"))
        if not raw:
            raise SessionNotFound(f"session {sid} not found")
        return SessionMeta.from_hash(sid, raw)

    async def list_sessions(
        self, tenant: str, *, page_size: int = 50, page_token: str = "", model: str = ""
    ) -> tuple[list[SessionMeta], str]:
        """A page of the tenant's sessions (oldest first) and the next page's token ('' on the last page)."""
        page_size = max(1, min(page_size or 50, 1000))
        index = self.keys.tenant_index(tenant)
        found: list[SessionMeta] = []
        cursor = page_token  # index members are "<created ms>:<sid>"
        while True:
            members = await self.redis.zrangebylex(index, f"({cursor}" if cursor else "-", "+", start=0, num=page_size)
            if not members:
                return found, ""
            async with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(self.keys.session(member.decode().split(":", 1)[1], "meta"))
                raws = await pipe.execute()
            expired = []
            for member, raw in zip(members, raws):
                cursor = member.decode()
                if not raw:
                    expired.append(member)
                    continue
                meta = SessionMeta.from_hash(cursor.split(":", 1)[1], raw)
                if model and meta.model != model:
                    continue
                found.append(meta)
                if len(found) == page_size:
                    break
            if expired:
                await self.redis.zrem(index, *expired)
            if len(found) == page_size:
                return found, cursor
            if len(members) < page_size:
                return found, ""

    async def count_sessions(self, tenant: str, *, exact: bool = False) -> int:
        """The tenant's sessions. Cheap: the size of its index, which may still hold expired sessions (an upper
        bound); exact: drops the expired ones first (one EXISTS per indexed session)."""
        index = self.keys.tenant_index(check_name("tenant", tenant))
        if not exact:
            return int(await self.redis.zcard(index))
        members = await self.redis.zrange(index, 0, -1)
        if not members:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(self.keys.session(member.decode().split(":", 1)[1], "meta"))
            alive = await pipe.execute()
        dead = [member for member, exists in zip(members, alive) if not exists]
        if dead:
            await self.redis.zrem(index, *dead)
        return len(members) - len(dead)

    async def delete_session(self, sid: str) -> None:
        """Deletes the session's metadata, state, lease and kept earlier states; SessionNotFound when unknown."""
        meta = await self.get_session(sid)
        deleted = await self.redis.delete(*self.keys.session_all(sid, meta.version, meta.keep_versions))
        await self.redis.zrem(self.keys.tenant_index(meta.tenant), _index_member(meta))
        if not deleted:
            raise SessionNotFound(f"session {sid} not found")

    async def fork_session(
        self,
        sid: str,
        *,
        ttl_ms: int | None = None,
        metadata: Mapping[str, str] | None = None,
        sampling: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        state_version: int | None = None,
    ) -> SessionMeta:
        """A new session holding a copy of sid's state, copied inside Redis (O(1) round trips): its current one, or
        the earlier `state_version` it still keeps (a branch; the fork starts at that version). SessionNotFound for
        a version it no longer keeps (evicted, saying so) or does not have yet."""
        if ttl_ms is not None and ttl_ms <= 0:
            raise InvalidArgument("ttl must be positive")
        fork_id = new_session_id(fork_of=check_session_id(sid))
        overrides: list[str] = ["forked_from", sid]
        if ttl_ms is not None:
            overrides += ["ttl", str(ttl_ms)]
        if metadata:
            overrides += ["metadata", json.dumps(dict(metadata), sort_keys=True)]
        if sampling is not None:
            overrides += ["sampling", json.dumps(dict(sampling), sort_keys=True)]
        src_meta, src_state, _ = self.keys.session_keys(sid)
        dst_meta, dst_state, _ = self.keys.session_keys(fork_id)
        args = ["" if expected_version is None else str(expected_version), str(now_ms()),
                "" if state_version is None else str(state_version), *overrides]
        keys = [src_meta, src_state, dst_meta, dst_state, self.keys.session(sid, "kept"),
                self.keys.kept_state(sid, state_version or 0)]
        result = await self._fork(keys=keys, args=args)
        if result[0] == -2:
            raise SessionNotFound(f"session {sid} not found")
        if result[0] == -3:
            raise VersionConflict(f"session {sid} is at version {result[1]}, not {expected_version}")
        if result[0] == -4:
            raise SessionNotFound(f"state version {state_version} of session {sid} was evicted: the session keeps "
                                  f"its last {result[2]} earlier versions (keep_versions), and is at version "
                                  f"{result[1]}")
        if result[0] == -5:
            raise SessionNotFound(f"session {sid} has no state version {state_version} (it is at version "
                                  f"{result[1]})")
        meta = await self.get_session(fork_id)
        await self.redis.zadd(self.keys.tenant_index(meta.tenant), {_index_member(meta): 0})
        return meta
