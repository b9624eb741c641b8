"""The store's foundation: connection settings, the Redis connection, the key layout and error translation.

Every key rwkv-serve writes is spelled in `Keys`, so the layout can be read (and changed for Redis Cluster) in
one place. A session's keys share one hash tag, so Cluster keeps them in one slot:
  rwkv:{sid}:meta      hash: tenant, model, template, version, created, updated, ttl, ... (sessions.SessionMeta)
  rwkv:{sid}:state     the engine's state record (bytes) at meta.version
  rwkv:{sid}:lease     random token of the worker running a turn (turns.py)
  rwkv:{sid}:staging:<token>  a commit's bytes, renamed onto :state by the compare-and-set script
  rwkv:{sid}:turn      the last committed turn's id, input digest and result (a retry of it is answered from here)
  rwkv:{sid}:state:v<n>  an earlier state kept for branching (keep_versions); rwkv:{sid}:kept: n -> "tokens turns"
  rwkv:tenant:<tenant>:sessions  sorted-set index for ListSessions (lazily pruned of expired sessions)
  rwkv:worker:<id>     a worker's registry record (JSON) with a heartbeat TTL; rwkv:workers indexes the ids
  rwkv:preset:<model>:<name>     preset initial states (state-tuned files), no TTL
  rwkv:presetinfo:<model>        hash: preset name -> JSON (description, tokens, created, bytes)
  rwkv:prefix:{<model>}:entry:<sha256>  state at a message boundary (content-addressed), TTL refreshed on use;
                       :lru :sizes :bytes index it for the per-model size bound (store/prefixes.py)
  rwkv:apikey:<hash>   the tenant of an API key, keyed by the key's hash; the key itself is never stored
  rwkv:quota:<tenant>:tokens:<window>  tokens the tenant used in one budget window (expires with it)

A fork's id keeps its source's hash tag ("<family>.<suffix>", keys rwkv:{<family>}.<suffix>:...), so the
server-side COPY of the state bytes stays inside one slot even on Redis Cluster.

The store knows bytes only: the state record's format belongs to worker.state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.asyncio.connection as redis_connection
import redis.exceptions
from pydantic import Field
from pydantic_settings import BaseSettings
from redis.asyncio.cluster import RedisCluster
from redis.sentinel import MasterNotFoundError, SlaveNotFoundError

from common.errors import InvalidArgument, StoreUnavailable
from common.store.connect import Mode, open_connection

if TYPE_CHECKING:
    from common.store import StateStore

log = logging.getLogger(__name__)

_SID_RE = re.compile(r"^[A-Za-z0-9_-]{6,64}(\.[A-Za-z0-9_-]{4,32})?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def now_ms() -> int:
    return int(time.time() * 1000)


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

    def session_all(self, sid: str, version: int = 0, keep_versions: int = 0) -> tuple[str, ...]:
        """Every key a session at `version` owns (what deleting it removes): with keep_versions, its kept earlier
        states too (and the ones a commit racing the delete may add or have left)."""
        kept = [self.kept_state(sid, v) for v in range(max(1, version - keep_versions - 1), version + 2)] \
            if keep_versions > 0 else []
        return (*self.session_keys(sid), self.session(sid, "turn"), self.session(sid, "kept"), *kept)

    def kept_state(self, sid: str, version: int) -> str:
        """An earlier state of a session that keeps versions (rwkv:{sid}:state:v<version>; never v0 or below)."""
        return self.session(sid, f"state:v{max(version, 0)}")

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
        """A prefix-cache entry (store/prefixes.py); every key of a model's cache shares the hash tag {<model>}."""
        return f"{self.prefix}:prefix:{{{check_name('model', model)}}}:entry:{digest}"

    def prefix_meta(self, model: str, part: str) -> str:
        """The model's prefix-cache index keys (lru, sizes, bytes) and staging keys, in the entries' slot."""
        return f"{self.prefix}:prefix:{{{check_name('model', model)}}}:{part}"

    @property
    def api_key_scan(self) -> str:
        return f"{self.prefix}:apikey:"

    def api_key(self, key_hash: str) -> str:
        if not _HASH_RE.match(key_hash):
            raise InvalidArgument("an API key hash is 64 lowercase hex digits")
        return f"{self.api_key_scan}{key_hash}"

    def tokens(self, tenant: str, window: int) -> str:
        return f"{self.prefix}:quota:{check_name('tenant', tenant)}:tokens:{window}"


# What a Redis that is down, restarting or too slow raises (BusyLoadingError, while it reloads, is a ConnectionError),
# and what a cluster or a failover answers meanwhile: READONLY (a master became a replica), CLUSTERDOWN, TRYAGAIN
# and MOVED/ASK that outlived redis-py's retries, no master known to Sentinel. All of it passes: retry shortly.
_STORE_DOWN = (aioredis.ConnectionError, aioredis.TimeoutError, OSError, redis.exceptions.ReadOnlyError,
               redis.exceptions.ClusterError, redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
               redis.exceptions.AskError, redis.exceptions.RedisClusterException,
               MasterNotFoundError, SlaveNotFoundError)


# redis-py's asyncio connections can raise a bare AttributeError or TypeError when a connection is torn down under a
# command: a concurrent disconnect (a cluster's failover resets its nodes' connections) leaves the writer None mid
# send, and CPython 3.12+ clears a peer-reset transport's internals before a write (redis/redis-py#4287, #2349).
# Seen here when a Cluster master was SIGKILLed mid-conversation (tests/test_cluster_e2e.py). They are no
# RedisErrors, so they pass every retry layer; raised from within the connection code they are the store being
# unreachable like any ConnectionError. Anywhere else the same exception types are bugs and stay unexpected.
_REDIS_CONNECTION_CODE = redis_connection.__file__


def _torn_connection(exc: BaseException) -> bool:
    """Whether `exc` is an AttributeError/TypeError raised inside redis-py's asyncio connection code."""
    if not isinstance(exc, (AttributeError, TypeError)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _REDIS_CONNECTION_CODE:
            return True
        tb = tb.tb_next
    return False


def store_errors(cls: type) -> type:
    """Class decorator: every public coroutine that cannot reach Redis raises StoreUnavailable (UNAVAILABLE, with
    a retry hint) instead of an unexpected exception (INTERNAL), so callers fail fast and retry. Any other Redis
    error (a bug, or a key another program wrote) is logged with its traceback and also passed on as
    StoreUnavailable: no redis-py exception text reaches a client as UNKNOWN or INTERNAL."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or getattr(method, "_keeps_redis_errors", False) \
                or not inspect.iscoroutinefunction(method):
            continue

        @functools.wraps(method)
        async def translated(self: Any, *args: Any, __method: Any = method, __name: str = name, **kwargs: Any) -> Any:
            try:
                return await __method(self, *args, **kwargs)
            except _STORE_DOWN as exc:
                raise StoreUnavailable(f"the state store cannot be reached ({type(exc).__name__}: {exc})") from exc
            except redis.exceptions.RedisError as exc:
                log.error("state store call %s failed", __name, exc_info=True)
                raise StoreUnavailable(f"the state store refused the call ({type(exc).__name__})") from exc
            except (AttributeError, TypeError) as exc:
                if not _torn_connection(exc):
                    raise
                log.warning("state store call %s: connection torn down under it", __name, exc_info=True)
                raise StoreUnavailable("the state store cannot be reached (its connection closed under a call)") \
                    from exc

        setattr(cls, name, translated)
    return cls


def keeps_redis_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a lifecycle call (verify, close) whose callers want Redis's own exceptions, not StoreUnavailable."""
    method._keeps_redis_errors = True  # type: ignore[attr-defined]
    return method


@store_errors
class StoreBase:
    """The connection every part of the store shares (`self.redis`, `self.keys`) and its lifecycle."""

    def __init__(self, client: Any, prefix: str = "rwkv") -> None:
        self.redis = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.url = ""  # the URL it was opened with, password redacted (for messages)
        self.mode: Mode = "cluster" if isinstance(client, RedisCluster) else "single"
        self.cluster_forced: bool | None = None
        self.wait_replicas = 0  # > 0: a commit waits until that many replicas hold it (turns.py)
        self.wait_timeout_ms = 1000
        self._node_kwargs: dict[str, Any] = {}
        self._nodes: dict[tuple[str, int], aioredis.Redis] = {}  # cluster mode: a client per master, by address

    @classmethod
    def from_url(cls, url: str, prefix: str = "rwkv", *, cluster: bool | None = None,
                 ca_cert: str | Path | None = None, client_cert: str | Path | None = None,
                 client_key: str | Path | None = None, timeout_s: float | None = 2.0,
                 connect_timeout_s: float | None = 2.0, retries: int = 1) -> Any:
        """A store on a new connection pool: one node, a Redis Cluster (detected, or `cluster` forces it) or
        Sentinel (`redis-sentinel://`); see common.store.connect for the URL forms."""
        conn = open_connection(url, cluster=cluster, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
                               timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, retries=retries)
        store = cls(conn.client, prefix)
        store.url, store.mode, store.cluster_forced, store._node_kwargs = conn.url, conn.mode, conn.forced, \
            conn.node_kwargs
        return store

    @keeps_redis_errors
    async def verify(self) -> None:
        """Asks Redis once at startup; StoreConfigError with one line naming the fix for what would otherwise fail
        every call: credentials, TLS, cluster mode forced against what the server is, a cluster that is down, a
        read-only replica given as the URL (a process that cannot work should not start)."""
        where = self.url or "Redis"
        no_password = StoreConfigError(f"{where} requires a password: put it in the URL "
                                       "(redis://:PASSWORD@host:port/db)")
        try:
            await self.redis.ping()
            await self._verify_topology(where)
        except redis.exceptions.AuthenticationError as exc:
            if "password" not in self._node_kwargs and not self._password_given():
                raise no_password from None
            raise StoreConfigError(f"{where} rejected the credentials: {exc} (check the password in the Redis URL)"
                                   ) from None
        except redis.exceptions.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise no_password from None
            raise
        except MasterNotFoundError as exc:
            raise StoreConfigError(f"no Sentinel at {where} knows a master of that name ({exc}): check the "
                                   "sentinels' addresses and the service name in the URL") from None
        except (redis.exceptions.RedisClusterException, redis.exceptions.ClusterDownError) as exc:
            if "Cluster mode is not enabled" in str(exc):
                raise StoreConfigError(f"{where} is not a Redis Cluster node but cluster mode is forced on "
                                       f"({_CLUSTER_SETTING}=true): unset the setting (it is detected) or point the "
                                       "URL at a cluster node") from None
            raise StoreConfigError(f"the Redis Cluster at {where} is not usable ({exc}): wait until it reports "
                                   "cluster_state:ok, or fix its slot coverage") from None
        except redis.exceptions.ConnectionError as exc:
            if "SSL" in str(exc) or "certificate" in str(exc).lower():
                raise StoreConfigError(f"TLS to {where} failed: {exc}") from None
            if self.mode == "cluster":  # the URL's node answered, but a node it lists does not (redis-py 8 asks one)
                raise StoreConfigError(f"the Redis Cluster at {where} is not usable ({exc}): wait until every "
                                       "node answers and it reports cluster_state:ok") from None
            raise

    def _password_given(self) -> bool:
        pool = getattr(self.redis, "connection_pool", None)
        return bool(pool is not None and pool.connection_kwargs.get("password"))

    async def _verify_topology(self, where: str) -> None:
        setting = _CLUSTER_SETTING
        if self.mode == "cluster":
            info = await self.redis.cluster_info()
            if info.get("cluster_state") != "ok":
                raise StoreConfigError(f"the Redis Cluster at {where} is down (cluster_state: "
                                       f"{info.get('cluster_state')}): wait for it, or fix its slot coverage")
            return
        enabled = bool((await self.redis.info("cluster")).get("cluster_enabled"))
        if enabled:
            raise StoreConfigError(f"{where} is a Redis Cluster node but cluster mode is forced off ({setting}=false):"
                                   " unset the setting (it is detected) or set it to true")
        if self.cluster_forced:
            raise StoreConfigError(f"{where} is not a Redis Cluster node but cluster mode is forced on ({setting}="
                                   "true): unset the setting (it is detected) or point the URL at a cluster node")
        role = (await self.redis.info("replication")).get("role")
        if role == "slave":
            raise StoreConfigError(f"{where} is a read-only replica: give the master's URL, or a "
                                   "redis-sentinel://... URL so that clients follow the master through failovers")

    @keeps_redis_errors
    async def close(self) -> None:
        for node in self._nodes.values():
            await node.aclose()
        self._nodes.clear()
        await self.redis.aclose()

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def _client_for(self, key: str, address: tuple[str, int] | None = None) -> Any:
        """The client a multi-command pipeline on `key`'s slot runs on: the store's own, or in cluster mode a client
        of the master that owns the slot (one connection for the whole pipeline, so WAIT after a write and a GET
        after a script see the same node). `address`: the owner a MOVED named, newer than the slot table."""
        if self.mode != "cluster":
            return self.redis
        if address is None:
            node = self.redis.get_node_from_key(key)
            address = (node.host, node.port)
        client = self._nodes.get(address)
        if client is None:
            client = self._nodes[address] = aioredis.Redis(host=address[0], port=address[1], **self._node_kwargs)
        return client

    async def _forget_node(self, client: Any) -> None:
        """Drops a node client that failed and re-reads the cluster's slot table (best effort)."""
        for address, node in list(self._nodes.items()):
            if node is client:
                del self._nodes[address]
                await node.aclose()
        try:
            await self.redis.nodes_manager.initialize()
        except (redis.exceptions.RedisError, OSError):
            pass  # every startup node may be down for a moment: the next call tries again

    async def _run_with_script(self, script: Any, build: Callable[[Any], None], *, key: str) -> list[Any]:
        """Runs the commands `build` queues on a plain (non-transaction) pipeline on `key`'s node, one of them an
        EVALSHA of `script`: one round trip. (redis-py's own script-in-pipeline support sends SCRIPT EXISTS first,
        every time: a round trip more.) When Redis does not know the script (a restart, SCRIPT FLUSH, a new
        master) it is loaded and the pipeline run again; in cluster mode a MOVED (the slot has another owner now)
        goes to the owner it names, an ASK/TRYAGAIN (the slot is being migrated) waits a moment, for up to
        _REDIRECT_BUDGET_S. Every command queued here must be safe to repeat."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _REDIRECT_BUDGET_S
        owner: tuple[str, int] | None = None
        for attempt in itertools.count():
            client = await self._client_for(key, owner)
            async with client.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    return await pipe.execute()
                except redis.exceptions.NoScriptError:
                    if attempt > 3:
                        raise
                    script.sha = await client.script_load(script.script)
                except redis.exceptions.MovedError as exc:  # the slot has a new owner: go there, re-read the table
                    if self.mode != "cluster" or loop.time() > deadline:
                        raise
                    owner = (exc.host, int(exc.port))
                    with contextlib.suppress(redis.exceptions.RedisError, OSError):
                        await self.redis.nodes_manager.initialize()
                except (redis.exceptions.AskError, redis.exceptions.TryAgainError):  # the slot is being migrated
                    if self.mode != "cluster" or loop.time() > deadline:
                        raise
                    await asyncio.sleep(min(0.02 * 2 ** attempt, 0.2))
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    # Not repeated (a commit may have been applied before the connection died: the caller's retry
                    # with the same turn id finds out), but in cluster mode the slot table is refreshed, so the
                    # next call goes to whoever owns the slot after a failover.
                    if self.mode == "cluster":
                        await self._forget_node(client)
                    raise
        raise AssertionError("unreachable")


_REDIRECT_BUDGET_S = 2.0  # how long a turn follows MOVED and waits out ASK/TRYAGAIN (a slot migration) at most
_CLUSTER_SETTING = "RWKV_FRONT_REDIS_CLUSTER / RWKV_WORKER_REDIS_CLUSTER"


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
    # Redis Cluster: None = ask the server (INFO cluster); true/false force it (startup fails when it disagrees).
    redis_cluster: bool | None = None
    # Durable commits: a turn's commit waits until this many replicas hold it (WAIT on the session's node) before
    # turn_end is sent; 0 = acknowledged by the master alone. A timeout fails the turn (UNAVAILABLE): see turns.py.
    redis_wait_replicas: int = Field(0, ge=0)
    redis_wait_timeout_ms: int = Field(1000, gt=0)

    def open_store(self) -> StateStore:
        """A StateStore on a new connection pool, as these settings say."""
        from common.store import StateStore  # the facade is built on this module

        store = StateStore.from_url(self.redis_url, prefix=self.redis_prefix, cluster=self.redis_cluster,
                                    ca_cert=self.redis_ca_cert, client_cert=self.redis_client_cert,
                                    client_key=self.redis_client_key, timeout_s=self.redis_timeout_s,
                                    connect_timeout_s=self.redis_connect_timeout_s, retries=self.redis_retries)
        store.wait_replicas, store.wait_timeout_ms = self.redis_wait_replicas, self.redis_wait_timeout_ms
        return store
