"""Opening Redis from a URL: one node, a Redis Cluster (detected from the server, or forced), or Sentinel.

- `redis://[user:password@]host:port/db`, `rediss://...` (TLS): one node, or any node of a Redis Cluster. Cluster
  mode is read from the server (`INFO cluster`) unless the caller forces it on or off.
- `redis-sentinel://[user:password@]host:port[,host:port...]/service_name[/db]`, `rediss-sentinel://...` (TLS to
  the sentinels and the master): the master Sentinel names, looked up again after a failover without a restart.
  The credentials are the master's; `?sentinel_password=...` authenticates to sentinels that require it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

Mode = Literal["single", "cluster", "sentinel"]
SENTINEL_SCHEMES = ("redis-sentinel", "rediss-sentinel")


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


@dataclass
class Connection:
    """An opened client and what it is connected to."""

    client: Any  # redis.asyncio.Redis, or RedisCluster
    mode: Mode
    url: str  # redacted
    forced: bool | None = None  # the caller's cluster setting (None: detected)
    node_kwargs: dict[str, Any] = field(default_factory=dict)  # for per-node clients in cluster mode


def _parse_sentinel(url: str) -> tuple[list[tuple[str, int]], str, int, dict[str, Any], dict[str, Any]]:
    """(sentinels, service name, db, master connection kwargs, sentinel connection kwargs) of a sentinel URL."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    sentinels = []
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "26379")
        sentinels.append((host or "127.0.0.1", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{redact_url(url)}: expected redis-sentinel://host:port[,host:port...]/service_name[/db]")
    db = int(path[1]) if len(path) == 2 else 0
    credentials = parts.netloc.rpartition("@")[0]
    user, _, password = credentials.partition(":")
    master: dict[str, Any] = {}
    if user:
        master["username"] = urllib.parse.unquote(user)
    if password:
        master["password"] = urllib.parse.unquote(password)
    query = urllib.parse.parse_qs(parts.query)
    sentinel: dict[str, Any] = {}
    if "sentinel_password" in query:
        sentinel["password"] = query["sentinel_password"][0]
    return sentinels, path[0], db, master, sentinel


def detect_cluster(url: str, timeout_s: float | None, tls: dict[str, str]) -> bool | None:
    """Whether the server at `url` has cluster mode enabled; None when it cannot be asked (down, auth, ...): the
    caller's startup check (StateStore.verify) then reports what is wrong."""
    try:
        probe = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **tls)
        try:
            return bool(probe.info("cluster").get("cluster_enabled"))
        finally:
            probe.close()
    except (redis.RedisError, OSError, ValueError):
        return None


def open_connection(url: str, *, cluster: bool | None = None, ca_cert: str | Path | None = None,
                    client_cert: str | Path | None = None, client_key: str | Path | None = None,
                    timeout_s: float | None = 2.0, connect_timeout_s: float | None = 2.0,
                    retries: int = 1) -> Connection:
    """A client for `url` (bytes responses: states are binary); see the module docstring for the URL forms.

    A Redis that is down, restarting or stuck fails a call within about (retries + 1) x the timeout: callers
    never hang on it (redis-py's own default retries for ~5 s). A retry reconnects, so the first call after a
    Redis restart goes through on a fresh connection."""
    scheme = url.partition("://")[0]
    tls: dict[str, str] = {}
    if ca_cert:
        tls["ssl_ca_certs"] = str(ca_cert)
    if client_cert:
        tls["ssl_certfile"] = str(client_cert)
    if client_key:
        tls["ssl_keyfile"] = str(client_key)
    if tls and scheme not in ("rediss", "rediss-sentinel"):
        raise ValueError(f"Redis TLS files were given but {redact_url(url)} is not a rediss:// or "
                         "rediss-sentinel:// URL")
    common: dict[str, Any] = dict(decode_responses=False, socket_timeout=timeout_s,
                                  socket_connect_timeout=connect_timeout_s,
                                  retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries))
    if scheme in SENTINEL_SCHEMES:
        if cluster:
            raise ValueError(f"{redact_url(url)} is a Sentinel URL, but cluster mode is forced on")
        sentinels, service, db, master, sentinel_auth = _parse_sentinel(url)
        ssl = {"ssl": True, **tls} if scheme == "rediss-sentinel" else {}
        sentinel = Sentinel(sentinels, sentinel_kwargs={**common, **ssl, **sentinel_auth}, **common, **ssl)
        client = sentinel.master_for(service, db=db, **master)
        return Connection(client, "sentinel", redact_url(url), cluster)
    if cluster is None:
        cluster = bool(detect_cluster(url, connect_timeout_s, tls))
        forced = None
    else:
        forced = cluster
    if not cluster:
        return Connection(aioredis.Redis.from_url(url, **common, **tls), "single", redact_url(url), forced)
    parsed = urllib.parse.urlsplit(url)
    if parsed.path.strip("/") not in ("", "0"):
        raise ValueError(f"{redact_url(url)}: a Redis Cluster has only database 0; drop the /{parsed.path.strip('/')}")
    node_kwargs: dict[str, Any] = {**common, **tls}
    if parsed.username:
        node_kwargs["username"] = urllib.parse.unquote(parsed.username)
    if parsed.password:
        node_kwargs["password"] = urllib.parse.unquote(parsed.password)
    if scheme == "rediss":
        node_kwargs["ssl"] = True
    client = RedisCluster.from_url(url, **common, **tls)
    return Connection(client, "cluster", redact_url(url), forced, node_kwargs)
