"""The Redis state store: session metadata, versioned state bytes, leases, presets, prefix cache, worker registry.

Keys (a session's keys share one hash tag so Redis Cluster keeps them in one slot):
  rwkv:{sid}:meta      hash: tenant, model, template, version, created, updated, ttl, ... (see SessionMeta)
  rwkv:{sid}:state     the engine's state record (bytes) at meta.version
  rwkv:{sid}:lease     random token of the worker running a turn (SET NX PX)
  rwkv:{sid}:staging:<token>  a commit's bytes, renamed onto :state by the compare-and-set script
  rwkv:tenant:<tenant>:sessions  sorted-set index for ListSessions (lazily pruned of expired sessions)
  rwkv:worker:<id>     a worker's registry record (JSON) with a heartbeat TTL; rwkv:workers indexes the ids
  rwkv:preset:<model>:<name>     preset initial states (state-tuned files), no TTL
  rwkv:presetinfo:<model>        hash: preset name -> JSON (description, tokens, created, bytes)
  rwkv:prefix:<model>:<sha256>   state after a token prefix (content-addressed), TTL refreshed on use
  rwkv:apikey:<hash>   the tenant of an API key, keyed by the key's hash (service/auth.py); the key itself is
                       never stored
  rwkv:quota:<tenant>:tokens:<window>  tokens the tenant used in one budget window (expires with it)

A fork's id keeps its source's hash tag ("<family>.<suffix>", keys rwkv:{<family>}.<suffix>:...), so the
server-side COPY of the state bytes stays inside one slot even on Redis Cluster.

This module knows bytes only: the state record's format belongs to worker.state.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import Field
from pydantic_settings import BaseSettings
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from common.errors import (
    InvalidArgument,
    LeaseLost,
    PresetExists,
    PresetNotFound,
    SessionBusy,
    SessionNotFound,
    StateCorrupt,
    StoreUnavailable,
    VersionConflict,
)

_SID_RE = re.compile(r"^[A-Za-z0-9_-]{6,64}(\.[A-Za-z0-9_-]{4,32})?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
# New preset names: short, and safe in a URL, a shell and a Redis SCAN pattern. (Reads take the older, looser
# _NAME_RE, so presets registered before this check stay usable.)
_PRESET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STAGING_TTL_MS = 120_000  # a commit's staged bytes outlive a crashed worker by at most this


def now_ms() -> int:
    return int(time.time() * 1000)


def new_session_id(fork_of: str | None = None) -> str:
    """A fresh root id, or a fork id in the same hash-tag family as fork_of.

    Both carry 128 random bits of their own (a fork's suffix too: knowing a root id must not let anyone guess
    its forks), so an id cannot be guessed; tenancy is still checked on every call."""
    if fork_of is None:
        return secrets.token_urlsafe(16)
    return f"{fork_of.split('.', 1)[0]}.{secrets.token_urlsafe(16)}"


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


class StoreConfigError(RuntimeError):
    """Redis refused this process's configuration (bad password, TLS trouble): a startup error, not an RPC one."""


def check_session_id(sid: str) -> str:
    if not _SID_RE.match(sid):
        raise InvalidArgument(f"malformed session id {sid!r}")
    return sid


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"malformed {kind} {name!r}")
    return name


def check_preset_name(name: str) -> str:
    """A new preset's name: 1-64 of [A-Za-z0-9_.-], starting with a letter or digit; InvalidArgument otherwise."""
    if not _PRESET_NAME_RE.match(name):
        raise InvalidArgument(f"a preset name is 1-64 of [A-Za-z0-9_.-] starting with a letter or digit, "
                              f"not {name[:80]!r}")
    return name


@dataclass(frozen=True)
class PresetInfo:
    """What the store keeps about a preset beside its state bytes."""

    model: str
    name: str
    description: str = ""
    tokens: int = 0  # tokens the state has consumed (0 for a state-tuned file)
    created_ms: int = 0  # 0: stored before registration times were kept
    state_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps({"description": self.description, "tokens": self.tokens, "created": self.created_ms,
                           "bytes": self.state_bytes}, sort_keys=True)

    @classmethod
    def from_json(cls, model: str, name: str, raw: bytes | None) -> PresetInfo:
        """Parses an info entry; a missing or unreadable one gives the defaults (the state bytes are what count)."""
        try:
            h = json.loads(raw) if raw else {}
            return cls(model, name, str(h.get("description", "")), int(h.get("tokens", 0)),
                       int(h.get("created", 0)), int(h.get("bytes", 0)))
        except (ValueError, TypeError, AttributeError):
            return cls(model, name)


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
        }

    @classmethod
    def from_hash(cls, session_id: str, raw: Mapping[bytes, bytes]) -> SessionMeta:
        """Parses a meta hash; StateCorrupt when a field does not parse (something else wrote the key)."""
        try:
            return cls._parse(session_id, raw)
        except (KeyError, ValueError, TypeError) as exc:
            raise StateCorrupt(f"session {session_id} has unreadable metadata ({exc!r})") from None

    @classmethod
    def _parse(cls, session_id: str, raw: Mapping[bytes, bytes]) -> SessionMeta:
        h = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            session_id=session_id,
            tenant=h.get("tenant", ""),
            model=h["model"],
            template=h.get("template", "chat"),
            version=int(h["version"]),
            created_ms=int(h.get("created", 0)),
            updated_ms=int(h.get("updated", 0)),
            ttl_ms=int(h["ttl"]),
            system_prompt=h.get("system_prompt", ""),
            preset=h.get("preset", ""),
            forked_from=h.get("forked_from", ""),
            state_tokens=int(h.get("tokens", 0)),
            turns=int(h.get("turns", 0)),
            metadata=json.loads(h.get("metadata") or "{}"),
            sampling=json.loads(h.get("sampling") or "{}"),
        )


@dataclass(frozen=True)
class Lease:
    """Proof that this holder may run a turn on the session until the lease expires."""

    session_id: str
    token: str
    ttl_ms: int


# KEYS: meta, state, lease. ARGV: token, lease ms, now ms.
# Returns 1 (acquired), 0 (busy), -1 (no such session). Refreshes the session's TTL: a turn is a use.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS: meta, state, lease. ARGV: token, lease ms. _ACQUIRE that also returns the meta hash, so a turn's lease and
# its session read are one round trip: {1, {field, value, ...}} (acquired), {0} (busy), {-1} (no such session).
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: lease. ARGV: token, lease ms. Returns 1 when still held (and extended), else 0.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: token. Deletes the lease only when this holder still owns it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease. ARGV: holder prefix ("<worker id>|"). Deletes the lease when that holder owns it, whatever its
# token: the front breaks the lease of a worker it saw die, so the session's next turn need not wait for the TTL.
_BREAK = """
local token = redis.call('GET', KEYS[1])
if token and string.sub(token, 1, string.len(ARGV[1])) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: meta, state, lease, staging. ARGV: token, expected version, now ms, state tokens, turns added, release
# ('1': also delete the lease, whatever the outcome, once the token is checked to be ours).
# Compare-and-set: the staged bytes become the state only if the lease is still ours and the version is the
# expected one; a stale worker can never overwrite a newer state. RENAME is O(1) whatever the state's size.
# Returns {new version} or {-1} (lease lost), {-2} (session gone), {-3, current version}, {-4} (staging gone).
_COMMIT = """
local ours = redis.call('GET', KEYS[3]) == ARGV[1]
if ours and ARGV[6] == '1' then redis.call('DEL', KEYS[3]) end
local function fail(code, extra)
  redis.call('DEL', KEYS[4])
  if extra then return {code, extra} end
  return {code}
end
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return fail(-2) end
if not ours then return fail(-1) end
if tonumber(version) ~= tonumber(ARGV[2]) then return fail(-3, tonumber(version)) end
if redis.call('EXISTS', KEYS[4]) == 0 then return fail(-4) end
local new_version = tonumber(version) + 1
redis.call('RENAME', KEYS[4], KEYS[2])
redis.call('HSET', KEYS[1], 'version', new_version, 'updated', ARGV[3], 'tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'turns', ARGV[5])
local ttl = redis.call('HGET', KEYS[1], 'ttl')
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {new_version}
"""

# KEYS: source meta, source state, fork meta, fork state. ARGV: expected version or '', now ms,
# then field/value pairs that override the copied meta. Returns {version} or {-2} / {-3, version}.
_FORK = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {-2} end
if ARGV[1] ~= '' and tonumber(version) ~= tonumber(ARGV[1]) then return {-3, tonumber(version)} end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('HSET', KEYS[3], 'created', ARGV[2], 'updated', ARGV[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
local ttl = redis.call('HGET', KEYS[3], 'ttl')
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('COPY', KEYS[2], KEYS[4])
  redis.call('PEXPIRE', KEYS[4], ttl)
end
redis.call('PEXPIRE', KEYS[3], ttl)
return {tonumber(version)}
"""


# What a Redis that is down, restarting or too slow raises (BusyLoadingError, while it reloads, is a ConnectionError).
_STORE_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)
_NOT_TRANSLATED = frozenset({"close", "verify"})  # lifecycle calls keep Redis's own exceptions


def _store_errors(cls: type) -> type:
    """Class decorator: every public coroutine that cannot reach Redis raises StoreUnavailable (UNAVAILABLE, with
    a retry hint) instead of an unexpected exception (INTERNAL), so callers fail fast and retry."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or name in _NOT_TRANSLATED or not inspect.iscoroutinefunction(method):
            continue

        @functools.wraps(method)
        async def translated(self: Any, *args: Any, __method: Any = method, **kwargs: Any) -> Any:
            try:
                return await __method(self, *args, **kwargs)
            except _STORE_DOWN as exc:
                raise StoreUnavailable(f"the state store cannot be reached ({type(exc).__name__}: {exc})") from exc

        setattr(cls, name, translated)
    return cls


@_store_errors
class StateStore:
    """Async access to everything rwkv-serve keeps in Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "rwkv") -> None:
        self.redis = client
        self.prefix = prefix
        self.url = ""  # the URL it was opened with, password redacted (for messages)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._commit = client.register_script(_COMMIT)
        self._begin = client.register_script(_BEGIN)
        self._fork = client.register_script(_FORK)
        self._break = client.register_script(_BREAK)

    @classmethod
    def from_url(cls, url: str, prefix: str = "rwkv", *, ca_cert: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, timeout_s: float | None = 2.0, connect_timeout_s: float | None = 2.0,
                 retries: int = 1) -> StateStore:
        """A store on a new connection pool (bytes responses: states are binary).

        A Redis that is down, restarting or stuck fails a call within about (retries + 1) x the timeout, as
        StoreUnavailable (UNAVAILABLE): callers never hang on it (redis-py's own default retries for ~5 s). A
        retry reconnects, so the first call after a Redis restart goes through on a fresh connection.

        `redis://:password@host:port/db` authenticates (`redis://user:password@...` for an ACL user);
        `rediss://...` speaks TLS, verified against `ca_cert` (else the system CAs), with an optional client
        certificate for servers that require one."""
        tls: dict[str, str] = {}
        if ca_cert:
            tls["ssl_ca_certs"] = str(ca_cert)
        if client_cert:
            tls["ssl_certfile"] = str(client_cert)
        if client_key:
            tls["ssl_keyfile"] = str(client_key)
        if tls and not url.startswith("rediss://"):
            raise ValueError(f"Redis TLS files were given but {redact_url(url)} is not a rediss:// URL")
        client = aioredis.Redis.from_url(
            url, decode_responses=False, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries), **tls)
        store = cls(client, prefix)
        store.url = redact_url(url)
        return store

    async def verify(self) -> None:
        """Pings Redis once at startup; StoreConfigError with a clear message for credentials or TLS trouble
        (a process that cannot authenticate should not start, rather than fail every call)."""
        where = self.url or "Redis"
        try:
            await self.redis.ping()
        except redis.exceptions.AuthenticationError as exc:
            if not self.redis.connection_pool.connection_kwargs.get("password"):
                raise StoreConfigError(f"{where} requires a password: put it in the URL "
                                       "(redis://:PASSWORD@host:port/db)") from None
            raise StoreConfigError(f"{where} rejected the credentials: {exc} (check the password in the Redis URL)"
                                   ) from None
        except redis.exceptions.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise StoreConfigError(f"{where} requires a password: put it in the URL "
                                       "(redis://:PASSWORD@host:port/db)") from None
            raise
        except redis.exceptions.ConnectionError as exc:
            if "SSL" in str(exc) or "certificate" in str(exc).lower():
                raise StoreConfigError(f"TLS to {where} failed: {exc}") from None
            raise

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # ---- keys -------------------------------------------------------------------------------------------

    def session_key(self, sid: str, part: str) -> str:
        family, dot, rest = check_session_id(sid).partition(".")
        return f"{self.prefix}:{{{family}}}{dot}{rest}:{part}"

    def _keys(self, sid: str) -> tuple[str, str, str]:
        return self.session_key(sid, "meta"), self.session_key(sid, "state"), self.session_key(sid, "lease")

    def _index_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:sessions"

    # ---- sessions ---------------------------------------------------------------------------------------

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
    ) -> SessionMeta:
        """Stores a new session at version 0 (no state yet: the first turn builds it)."""
        if ttl_ms <= 0:
            raise InvalidArgument("ttl must be positive")
        _check_name("model", model)
        if preset:
            _check_name("preset", preset)
        now = now_ms()
        meta = SessionMeta(
            session_id=new_session_id(),
            tenant=tenant,
            model=model,
            template=template,
            version=0,
            created_ms=now,
            updated_ms=now,
            ttl_ms=ttl_ms,
            system_prompt=system_prompt,
            preset=preset,
            metadata=dict(metadata or {}),
            sampling=dict(sampling or {}),
        )
        meta_key = self.session_key(meta.session_id, "meta")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta_key, mapping=meta.to_hash())
            pipe.pexpire(meta_key, ttl_ms)
            await pipe.execute()
        await self._index(meta)
        return meta

    async def _index(self, meta: SessionMeta) -> None:
        await self.redis.zadd(self._index_key(meta.tenant), {f"{meta.created_ms:015d}:{meta.session_id}": 0})

    async def get_session(self, sid: str) -> SessionMeta:
        """The session's metadata; SessionNotFound when unknown or expired."""
        raw = await self.redis.hgetall(self.session_key(sid, "meta"))
        if not raw:
            raise SessionNotFound(f"session {sid} not found")
        return SessionMeta.from_hash(sid, raw)

    async def list_sessions(
        self, tenant: str, *, page_size: int = 50, page_token: str = "", model: str = ""
    ) -> tuple[list[SessionMeta], str]:
        """A page of the tenant's sessions (oldest first) and the next page's token ('' on the last page)."""
        page_size = max(1, min(page_size or 50, 1000))
        index = self._index_key(tenant)
        found: list[SessionMeta] = []
        cursor = page_token  # index members are "<created ms>:<sid>": ordered by creation, unique
        while True:
            members = await self.redis.zrangebylex(index, f"({cursor}" if cursor else "-", "+", start=0, num=page_size)
            if not members:
                return found, ""
            async with self.redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(self.session_key(member.decode().split(":", 1)[1], "meta"))
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

    async def delete_session(self, sid: str) -> None:
        """Deletes the session's metadata, state and lease; SessionNotFound when unknown."""
        meta = await self.get_session(sid)
        deleted = await self.redis.delete(*self._keys(sid))
        await self.redis.zrem(self._index_key(meta.tenant), f"{meta.created_ms:015d}:{sid}")
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
    ) -> SessionMeta:
        """A new session holding a copy of sid's state, copied inside Redis (O(1) round trips)."""
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
        src_meta, src_state, _ = self._keys(sid)
        dst_meta, dst_state, _ = self._keys(fork_id)
        args = ["" if expected_version is None else str(expected_version), str(now_ms()), *overrides]
        result = await self._fork(keys=[src_meta, src_state, dst_meta, dst_state], args=args)
        if result[0] == -2:
            raise SessionNotFound(f"session {sid} not found")
        if result[0] == -3:
            raise VersionConflict(f"session {sid} is at version {result[1]}, not {expected_version}")
        meta = await self.get_session(fork_id)
        await self._index(meta)
        return meta

    # ---- leases -----------------------------------------------------------------------------------------

    async def acquire_lease(self, sid: str, ttl_ms: int, holder: str = "") -> Lease:
        """Takes the session's lease (one turn at a time) and refreshes its TTL; SessionBusy if held.

        `holder` (a worker id) prefixes the token, so that break_lease can free the lease of a dead holder."""
        token = secrets.token_hex(16)
        lease = Lease(sid, f"{_check_name('lease holder', holder)}|{token}" if holder else token, ttl_ms)
        result = await self._acquire(keys=list(self._keys(sid)), args=[lease.token, ttl_ms, now_ms()])
        if result == -1:
            raise SessionNotFound(f"session {sid} not found")
        if result == 0:
            raise SessionBusy(f"session {sid} is running another turn")
        return lease

    async def begin_turn(self, sid: str, ttl_ms: int, holder: str = "", *, with_state: bool = True
                         ) -> tuple[Lease, SessionMeta, bytes | None]:
        """acquire_lease + get_session (+ the state bytes' GET when with_state) in one round trip.

        The lease script (take the lease, refresh the TTL, return the meta hash) and a GET of the state are
        pipelined: the GET runs right after the script, while this caller holds the lease, so no commit can come
        between them (every commit checks the lease token) and the bytes are those of meta.version. Without
        with_state (a caller that expects its local cache to hit), or at version 0, the bytes are None.
        SessionNotFound / SessionBusy as acquire_lease."""
        token = secrets.token_hex(16)
        lease = Lease(sid, f"{_check_name('lease holder', holder)}|{token}" if holder else token, ttl_ms)
        meta_key, state_key, lease_key = self._keys(sid)

        def build(pipe: Any) -> None:
            pipe.evalsha(self._begin.sha, 3, meta_key, state_key, lease_key, lease.token, ttl_ms)
            if with_state:
                pipe.get(state_key)

        result, *data = await self._run_with_script(self._begin, build)
        if result[0] == -1:
            raise SessionNotFound(f"session {sid} not found")
        if result[0] == 0:
            raise SessionBusy(f"session {sid} is running another turn")
        fields = result[1]
        meta = SessionMeta.from_hash(sid, dict(zip(fields[::2], fields[1::2])))
        return lease, meta, (data[0] if data and meta.version > 0 else None)

    async def _run_with_script(self, script: Any, build: Any) -> list[Any]:
        """Runs the commands `build` queues on a plain (non-transaction) pipeline, one of them an EVALSHA of
        `script`: one round trip. (redis-py's own script-in-pipeline support sends SCRIPT EXISTS first, every
        time: a round trip more.) When Redis does not know the script (a restart, SCRIPT FLUSH) it is loaded and
        the pipeline run once more: every command queued here must be safe to repeat."""
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    return await pipe.execute()
                except redis.exceptions.NoScriptError:
                    if attempt:
                        raise
            script.sha = await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    async def renew_lease(self, lease: Lease) -> None:
        """Extends the lease by its TTL; LeaseLost when it expired or was taken over."""
        if not await self._renew(keys=[self.session_key(lease.session_id, "lease")], args=[lease.token, lease.ttl_ms]):
            raise LeaseLost(f"lease on session {lease.session_id} was lost")

    async def release_lease(self, lease: Lease) -> bool:
        """Releases the lease if still held; False when it had already expired or changed hands."""
        return bool(await self._release(keys=[self.session_key(lease.session_id, "lease")], args=[lease.token]))

    async def break_lease(self, sid: str, holder: str) -> bool:
        """Deletes the session's lease if `holder` took it (the caller saw that worker die). Safe even if the
        holder lives on: its commit then fails the compare-and-set (LeaseLost) and its turn ends."""
        prefix = f"{_check_name('lease holder', holder)}|"
        return bool(await self._break(keys=[self.session_key(sid, "lease")], args=[prefix]))

    # ---- state ------------------------------------------------------------------------------------------

    async def get_version(self, sid: str) -> int:
        """The stored state's version (cheap: lets a worker validate its local cache)."""
        version = await self.redis.hget(self.session_key(sid, "meta"), "version")
        if version is None:
            raise SessionNotFound(f"session {sid} not found")
        return int(version)

    async def load_state(self, sid: str) -> tuple[SessionMeta, bytes | None]:
        """A consistent snapshot of the metadata and the state bytes (None at version 0)."""
        meta_key, state_key, _ = self._keys(sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.get(state_key)
            raw, data = await pipe.execute()
        if not raw:
            raise SessionNotFound(f"session {sid} not found")
        return SessionMeta.from_hash(sid, raw), data

    async def commit_state(
        self, lease: Lease, expected_version: int, data: bytes, *, state_tokens: int, turns: int = 1
    ) -> int:
        """Stores data as the state at expected_version + 1 if the lease is still held and nobody committed
        since expected_version (compare-and-set). Returns the new version; LeaseLost / VersionConflict /
        SessionNotFound otherwise, and the stored state is untouched. The lease stays held."""
        return await self._commit_pipeline(lease, expected_version, data, state_tokens, turns, release=False)

    async def commit_and_release(
        self, lease: Lease, expected_version: int, data: bytes, *, state_tokens: int, turns: int = 1
    ) -> int:
        """commit_state + release_lease in one round trip (the staging SET and the compare-and-set script,
        pipelined; the script deletes the lease after checking its token). Same checks and errors as
        commit_state; the lease is let go whatever the outcome, if it was still this holder's. When this raises
        StoreUnavailable the commit may or may not have happened: release_lease stays safe to call."""
        return await self._commit_pipeline(lease, expected_version, data, state_tokens, turns, release=True)

    async def _commit_pipeline(self, lease: Lease, expected_version: int, data: bytes, state_tokens: int,
                               turns: int, *, release: bool) -> int:
        sid = lease.session_id
        meta_key, state_key, lease_key = self._keys(sid)
        staging = self.session_key(sid, f"staging:{lease.token}")

        # One round trip: the bytes go to a staging key with a plain SET (no copy through Lua), then the
        # script renames it onto the state if the checks pass. (Repeating both, as on NOSCRIPT, is safe: the
        # SET rewrites the same staging key, and the script has not run.)
        def build(pipe: Any) -> None:
            pipe.set(staging, data, px=STAGING_TTL_MS)
            pipe.evalsha(self._commit.sha, 4, meta_key, state_key, lease_key, staging, lease.token,
                         expected_version, now_ms(), state_tokens, turns, "1" if release else "0")

        _, result = await self._run_with_script(self._commit, build)
        if result[0] == -1:
            raise LeaseLost(f"lease on session {sid} was lost; state not committed")
        if result[0] == -2:
            raise SessionNotFound(f"session {sid} was deleted; state not committed")
        if result[0] == -3:
            raise VersionConflict(f"session {sid} is at version {result[1]}, not {expected_version}")
        if result[0] == -4:
            raise LeaseLost(f"staged state of session {sid} expired before the commit")
        return int(result[0])

    # ---- presets and prefix cache ----------------------------------------------------------------------

    def _preset_key(self, model: str, name: str) -> str:
        return f"{self.prefix}:preset:{_check_name('model', model)}:{_check_name('preset', name)}"

    def _preset_info_key(self, model: str) -> str:
        return f"{self.prefix}:presetinfo:{_check_name('model', model)}"

    async def put_preset(self, model: str, name: str, data: bytes, *, description: str = "", tokens: int = 0,
                         replace: bool = True) -> PresetInfo:
        """Stores a preset's state record (the caller has validated it) and its info.

        replace=False refuses a taken name (PresetExists, atomically: SET NX). Replacing a preset drops the
        model's prefix cache: workers key its entries by the preset's bytes, so the old entries would only sit
        there until their TTL (and workers from before that keyed them by the preset's name)."""
        key = self._preset_key(model, check_preset_name(name))
        info = PresetInfo(model, name, description, tokens, now_ms(), len(data))
        existed = bool(await self.redis.exists(key))
        if not await self.redis.set(key, data, nx=not replace):
            raise PresetExists(f"preset {name!r} already exists for model {model!r}")
        # Not one transaction: the two keys may live in different Cluster slots. A reader between the two writes
        # sees the new state with the old (or no) info, which is harmless.
        await self.redis.hset(self._preset_info_key(model), name, info.to_json())
        if existed:
            await self.drop_prefix_cache(model)
        return info

    async def get_preset(self, model: str, name: str) -> bytes:
        data = await self.redis.get(self._preset_key(model, name))
        if data is None:
            raise PresetNotFound(f"no preset {name!r} for model {model!r}")
        return data

    async def has_preset(self, model: str, name: str) -> bool:
        return bool(await self.redis.exists(self._preset_key(model, name)))

    async def list_presets(self, model: str) -> list[str]:
        """Names of the model's presets, sorted. (A SCAN of the keyspace: the state keys are the truth, also for
        presets stored before the info hash existed.)"""
        prefix = f"{self.prefix}:preset:{_check_name('model', model)}:"
        names = [key.decode()[len(prefix) :] async for key in self.redis.scan_iter(match=prefix + "*", count=500)]
        return sorted(names)

    async def describe_presets(self, model: str) -> list[PresetInfo]:
        """The model's presets with their info, sorted by name."""
        names = await self.list_presets(model)
        if not names:
            return []
        raws = await self.redis.hmget(self._preset_info_key(model), names)
        return [PresetInfo.from_json(model, name, raw) for name, raw in zip(names, raws)]

    async def delete_preset(self, model: str, name: str) -> bool:
        """Removes a preset and its info, and drops the model's prefix cache (states built on it); False when there
        was none. Sessions that already ran a turn keep their own states."""
        removed = bool(await self.redis.delete(self._preset_key(model, name)))
        await self.redis.hdel(self._preset_info_key(model), name)
        if removed:
            await self.drop_prefix_cache(model)
        return removed

    async def drop_prefix_cache(self, model: str) -> int:
        """Deletes every cached prefix state of the model; returns how many. The cache only saves prefill, and
        its keys do not say which preset an entry was built on, so all of it goes."""
        pattern = self._prefix_key(model, "*")
        dropped = 0
        batch: list[bytes] = []
        async for key in self.redis.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) == 500:
                dropped += await self.redis.unlink(*batch)
                batch.clear()
        if batch:
            dropped += await self.redis.unlink(*batch)
        return dropped

    def _prefix_key(self, model: str, digest: str) -> str:
        return f"{self.prefix}:prefix:{_check_name('model', model)}:{digest}"

    async def put_prefix(self, model: str, digest: str, data: bytes, ttl_ms: int) -> None:
        await self.redis.set(self._prefix_key(model, digest), data, px=ttl_ms)

    async def get_prefix(self, model: str, digest: str, ttl_ms: int) -> bytes | None:
        """The cached state after a token prefix, refreshing its TTL; None on a miss."""
        return await self.redis.getex(self._prefix_key(model, digest), px=ttl_ms)

    # ---- worker registry --------------------------------------------------------------------------------

    async def register_worker(self, worker_id: str, record: Mapping[str, Any], ttl_ms: int) -> None:
        """Writes (or refreshes: the heartbeat) a worker's registry record with a TTL."""
        key = f"{self.prefix}:worker:{_check_name('worker id', worker_id)}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(key, json.dumps(dict(record), sort_keys=True), px=ttl_ms)
            pipe.sadd(f"{self.prefix}:workers", worker_id)
            await pipe.execute()

    async def unregister_worker(self, worker_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(f"{self.prefix}:worker:{_check_name('worker id', worker_id)}")
            pipe.srem(f"{self.prefix}:workers", worker_id)
            await pipe.execute()

    async def list_workers(self, model: str | None = None) -> list[dict[str, Any]]:
        """Live workers' records (those whose heartbeat has not expired), optionally of one model."""
        ids = sorted(i.decode() for i in await self.redis.smembers(f"{self.prefix}:workers"))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.get(f"{self.prefix}:worker:{worker_id}")
            records = await pipe.execute()
        dead = [worker_id for worker_id, record in zip(ids, records) if record is None]
        if dead:
            await self.redis.srem(f"{self.prefix}:workers", *dead)
        live = [json.loads(record) for record in records if record is not None]
        return [r for r in live if model is None or r.get("model") == model]

    # ---- tenants: API keys and quotas -------------------------------------------------------------------

    def _api_key_key(self, key_hash: str) -> str:
        if not _HASH_RE.match(key_hash):
            raise InvalidArgument("an API key hash is 64 lowercase hex digits")
        return f"{self.prefix}:apikey:{key_hash}"

    async def put_api_key(self, key_hash: str, tenant: str) -> None:
        """Maps an API key's hash to its tenant (the key itself is never stored)."""
        await self.redis.set(self._api_key_key(key_hash), _check_name("tenant", tenant))

    async def get_api_key(self, key_hash: str) -> str | None:
        """The tenant of an API key's hash; None when no such key is stored."""
        tenant = await self.redis.get(self._api_key_key(key_hash))
        return None if tenant is None else tenant.decode()

    async def delete_api_key(self, key_hash: str) -> bool:
        return bool(await self.redis.delete(self._api_key_key(key_hash)))

    async def list_api_keys(self) -> list[tuple[str, str]]:
        """(hash, tenant) of every stored key."""
        prefix = f"{self.prefix}:apikey:"
        hashes = [key.decode()[len(prefix):] async for key in self.redis.scan_iter(match=prefix + "*", count=500)]
        if not hashes:
            return []
        tenants = await self.redis.mget([prefix + h for h in hashes])
        return sorted((h, t.decode()) for h, t in zip(hashes, tenants) if t is not None)

    async def count_sessions(self, tenant: str, *, exact: bool = False) -> int:
        """The tenant's sessions. Cheap: the size of its index, which may still hold expired sessions (an upper
        bound); exact: drops the expired ones first (one EXISTS per indexed session)."""
        index = self._index_key(_check_name("tenant", tenant))
        if not exact:
            return int(await self.redis.zcard(index))
        members = await self.redis.zrange(index, 0, -1)
        if not members:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.exists(self.session_key(member.decode().split(":", 1)[1], "meta"))
            alive = await pipe.execute()
        dead = [member for member, exists in zip(members, alive) if not exists]
        if dead:
            await self.redis.zrem(index, *dead)
        return len(members) - len(dead)

    def _tokens_key(self, tenant: str, window: int) -> str:
        return f"{self.prefix}:quota:{_check_name('tenant', tenant)}:tokens:{window}"

    async def add_tokens(self, tenant: str, window: int, tokens: int, ttl_ms: int) -> int:
        """Adds to the tenant's token count of one budget window (the key expires after it); returns the total."""
        key = self._tokens_key(tenant, window)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, tokens)
            pipe.pexpire(key, ttl_ms)
            total, _ = await pipe.execute()
        return int(total)

    async def get_tokens(self, tenant: str, window: int) -> int:
        return int(await self.redis.get(self._tokens_key(tenant, window)) or 0)


class RedisSettings(BaseSettings):
    """The Redis connection fields of the front's and the worker's settings (each class has its own env prefix)."""

    # A password goes in the URL (redis://:PASSWORD@host:port/db); rediss:// speaks TLS, verified against
    # redis_ca_cert, with an optional client certificate for servers that require one.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "rwkv"  # key prefix; every front and worker of a deployment must use the same one
    redis_ca_cert: Path | None = None
    redis_client_cert: Path | None = None
    redis_client_key: Path | None = None
    redis_timeout_s: float = Field(2.0, gt=0)  # per Redis read/write; a stuck Redis fails calls (UNAVAILABLE)
    redis_connect_timeout_s: float = Field(2.0, gt=0)
    redis_retries: int = Field(1, ge=0)  # reconnect-and-retry per call (the first call after a Redis restart)

    def open_store(self) -> StateStore:
        """A StateStore on a new connection pool, as these settings say."""
        return StateStore.from_url(self.redis_url, prefix=self.redis_prefix, ca_cert=self.redis_ca_cert,
                                   client_cert=self.redis_client_cert, client_key=self.redis_client_key,
                                   timeout_s=self.redis_timeout_s, connect_timeout_s=self.redis_connect_timeout_s,
                                   retries=self.redis_retries)
