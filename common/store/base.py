"""The store's foundation: connection settings, the Redis connection, the key layout and error translation.

Every key rwkv-serve writes is spelled in `Keys`, so the layout can be read (and changed for Redis Cluster) in
one place. A session's keys share one hash tag, so Cluster keeps them in one slot:
  rwkv:{sid}:meta      hash: tenant, model, template, version, created, updated, ttl, ... (sessions.SessionMeta)
  rwkv:{sid}:state     the engine's state record (bytes) at meta.version
  rwkv:{sid}:lease     random token of the worker running a turn (turns.py)
  rwkv:{sid}:staging:<token>  a commit's bytes, renamed onto :state by the compare-and-set script
  rwkv:tenant:<tenant>:sessions  sorted-set index for ListSessions (lazily pruned of expired sessions)
  rwkv:worker:<id>     a worker's registry record (JSON) with a heartbeat TTL; rwkv:workers indexes the ids
  rwkv:preset:<model>:<name>     preset initial states (state-tuned files), no TTL
  rwkv:presetinfo:<model>        hash: preset name -> JSON (description, tokens, created, bytes)
  rwkv:prefix:<model>:<sha256>   state after a token prefix (content-addressed), TTL refreshed on use
  rwkv:apikey:<hash>   the tenant of an API key, keyed by the key's hash; the key itself is never stored
  rwkv:quota:<tenant>:tokens:<window>  tokens the tenant used in one budget window (expires with it)

A fork's id keeps its source's hash tag ("<family>.<suffix>", keys rwkv:{<family>}.<suffix>:...), so the
server-side COPY of the state bytes stays inside one slot even on Redis Cluster.

The store knows bytes only: the state record's format belongs to worker.state.
"""

from __future__ import annotations

import functools
import inspect
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.exceptions
from pydantic import Field
from pydantic_settings import BaseSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from common.errors import InvalidArgument, StoreUnavailable

if TYPE_CHECKING:
    from common.store import StateStore

_SID_RE = re.compile(r"^[A-Za-z0-9_-]{6,64}(\.[A-Za-z0-9_-]{4,32})?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def now_ms() -> int:
    return int(time.time() * 1000)


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


def check_name(kind: str, name: str) -> str:
    """A model id, preset name, tenant or worker id that is safe inside a key; InvalidArgument otherwise."""
    if not _NAME_RE.match(name):
        raise InvalidArgument(f"malformed {kind} {name!r}")
    return name


class Keys:
    """The key layout (see the module docstring); every name is checked before it becomes part of a key."""

    def __init__(self, prefix: str = "rwkv") -> None:
        self.prefix = prefix

    def session(self, sid: str, part: str) -> str:
        family, dot, rest = check_session_id(sid).partition(".")
        return f"{self.prefix}:{{{family}}}{dot}{rest}:{part}"

    def session_keys(self, sid: str) -> tuple[str, str, str]:
        """meta, state, lease."""
        return self.session(sid, "meta"), self.session(sid, "state"), self.session(sid, "lease")

    def tenant_index(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:sessions"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{check_name('worker id', worker_id)}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def preset(self, model: str, name: str) -> str:
        return f"{self.prefix}:preset:{check_name('model', model)}:{check_name('preset', name)}"

    def preset_scan(self, model: str) -> str:
        """The prefix of a model's preset keys (a SCAN pattern once '*' is appended)."""
        return f"{self.prefix}:preset:{check_name('model', model)}:"

    def preset_info(self, model: str) -> str:
        return f"{self.prefix}:presetinfo:{check_name('model', model)}"

    def prefix_state(self, model: str, digest: str) -> str:
        return f"{self.prefix}:prefix:{check_name('model', model)}:{digest}"

    @property
    def api_key_scan(self) -> str:
        return f"{self.prefix}:apikey:"

    def api_key(self, key_hash: str) -> str:
        if not _HASH_RE.match(key_hash):
            raise InvalidArgument("an API key hash is 64 lowercase hex digits")
        return f"{self.api_key_scan}{key_hash}"

    def tokens(self, tenant: str, window: int) -> str:
        return f"{self.prefix}:quota:{check_name('tenant', tenant)}:tokens:{window}"


# What a Redis that is down, restarting or too slow raises (BusyLoadingError, while it reloads, is a ConnectionError).
_STORE_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)


def store_errors(cls: type) -> type:
    """Class decorator: every public coroutine that cannot reach Redis raises StoreUnavailable (UNAVAILABLE, with
    a retry hint) instead of an unexpected exception (INTERNAL), so callers fail fast and retry."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or getattr(method, "_keeps_redis_errors", False) \
                or not inspect.iscoroutinefunction(method):
            continue

        @functools.wraps(method)
        async def translated(self: Any, *args: Any, __method: Any = method, **kwargs: Any) -> Any:
            try:
                return await __method(self, *args, **kwargs)
            except _STORE_DOWN as exc:
                raise StoreUnavailable(f"the state store cannot be reached ({type(exc).__name__}: {exc})") from exc

        setattr(cls, name, translated)
    return cls


def keeps_redis_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a lifecycle call (verify, close) whose callers want Redis's own exceptions, not StoreUnavailable."""
    method._keeps_redis_errors = True  # type: ignore[attr-defined]
    return method


@store_errors
class StoreBase:
    """The connection every part of the store shares (`self.redis`, `self.keys`) and its lifecycle."""

    def __init__(self, client: aioredis.Redis, prefix: str = "rwkv") -> None:
        self.redis = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.url = ""  # the URL it was opened with, password redacted (for messages)

    @classmethod
    def from_url(cls, url: str, prefix: str = "rwkv", *, ca_cert: str | Path | None = None,
                 client_cert: str | Path | None = None, client_key: str | Path | None = None,
                 timeout_s: float | None = 2.0, connect_timeout_s: float | None = 2.0, retries: int = 1) -> Any:
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

    @keeps_redis_errors
    async def verify(self) -> None:
        """Pings Redis once at startup; StoreConfigError with a clear message for credentials or TLS trouble
        (a process that cannot authenticate should not start, rather than fail every call)."""
        where = self.url or "Redis"
        no_password = StoreConfigError(f"{where} requires a password: put it in the URL "
                                       "(redis://:PASSWORD@host:port/db)")
        try:
            await self.redis.ping()
        except redis.exceptions.AuthenticationError as exc:
            if not self.redis.connection_pool.connection_kwargs.get("password"):
                raise no_password from None
            raise StoreConfigError(f"{where} rejected the credentials: {exc} (check the password in the Redis URL)"
                                   ) from None
        except redis.exceptions.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise no_password from None
            raise
        except redis.exceptions.ConnectionError as exc:
            if "SSL" in str(exc) or "certificate" in str(exc).lower():
                raise StoreConfigError(f"TLS to {where} failed: {exc}") from None
            raise

    @keeps_redis_errors
    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def _run_with_script(self, script: Any, build: Callable[[Any], None]) -> list[Any]:
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
        from common.store import StateStore  # the facade is built on this module

        return StateStore.from_url(self.redis_url, prefix=self.redis_prefix, ca_cert=self.redis_ca_cert,
                                   client_cert=self.redis_client_cert, client_key=self.redis_client_key,
                                   timeout_s=self.redis_timeout_s, connect_timeout_s=self.redis_connect_timeout_s,
                                   retries=self.redis_retries)
