"""The shared prefix-state cache: states at message boundaries, content-addressed, bounded in total size per model.

A boundary's digest names everything that built its state (the model's fingerprint, the storage dtype, the preset's
bytes and the token ids of every segment up to it, chained: worker/prefix_cache.py), so an entry answers only for
the exact state it holds and needs no invalidation. Layout (one hash tag per model, so that the scripts below touch
one Redis Cluster slot; the price: a model's cache lives on one master, which the size bound keeps in check):
  rwkv:prefix:{<model>}:entry:<digest>   a state record, with a TTL refreshed on every hit
  rwkv:prefix:{<model>}:lru              sorted set: digest -> last use (ms), for least-recently-used eviction
  rwkv:prefix:{<model>}:sizes            hash: digest -> bytes;  rwkv:prefix:{<model>}:bytes  their total
  rwkv:prefix:{<model>}:staging:<token>  a put's bytes, renamed onto the entry by the script (no copy through Lua)
The eviction loop deletes entries it finds in the index, whose names it builds from the digests: keys it was not
given, but always in the slot of the keys it was given (the same hash tag), so this holds on a cluster too.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

from common.errors import InvalidArgument
from common.store.base import StoreBase, now_ms, store_errors

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")

# KEYS: lru, then the candidate entries, shortest prefix first. ARGV: now ms, ttl ms, then the candidates' digests.
# Returns the 1-based position of the longest candidate that exists (its TTL and last use refreshed), 0 for none.
_FIND = """
for i = #KEYS, 2, -1 do
  if redis.call('PEXPIRE', KEYS[i], ARGV[2]) == 1 then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i + 1])
    return i - 1
  end
end
return 0
"""

# KEYS: lru, sizes, total, staging, entry. ARGV: digest, now ms, ttl ms, max bytes, size, entry key prefix.
# The staged bytes become the entry; then entries unused for a whole TTL (expired: their index records go) and
# the least recently used ones (until the total fits max bytes) are dropped. Returns the entries evicted.
_PUT = """
if redis.call('EXISTS', KEYS[4]) == 0 then return -1 end
local function forget(digest)
  local size = redis.call('HGET', KEYS[2], digest)
  if size then redis.call('DECRBY', KEYS[3], size) end
  redis.call('HDEL', KEYS[2], digest)
  redis.call('ZREM', KEYS[1], digest)
  redis.call('DEL', ARGV[6] .. digest)
end
forget(ARGV[1])
redis.call('RENAME', KEYS[4], KEYS[5])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
local total = redis.call('INCRBY', KEYS[3], ARGV[5])
local evicted = 0
for _, digest in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))) do
  forget(digest)
  evicted = evicted + 1
end
total = tonumber(redis.call('GET', KEYS[3]) or 0)
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 or oldest[1] == ARGV[1] then break end
  forget(oldest[1])
  evicted = evicted + 1
  total = tonumber(redis.call('GET', KEYS[3]) or 0)
end
return evicted
"""

_STAGING_TTL_MS = 60_000


def check_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument("a prefix digest is 64 lowercase hex digits")
    return digest


@store_errors
class PrefixStates(StoreBase):
    """Find the longest cached boundary of a prompt (one round trip), read it, store new boundaries."""

    def __init__(self, client: Any, prefix: str = "rwkv") -> None:
        super().__init__(client, prefix)
        self._find = client.register_script(_FIND)
        self._put = client.register_script(_PUT)

    async def find_prefix(self, model: str, digests: Sequence[str], ttl_ms: int) -> int:
        """How many of `digests` (a prompt's boundaries, in order) the longest cached one covers: 0 for none, i for
        digests[i - 1]. One round trip; the hit's TTL and last use are refreshed."""
        if not digests:
            return 0
        entries = [self.keys.prefix_state(model, check_digest(d)) for d in digests]
        lru = self.keys.prefix_meta(model, "lru")

        def build(pipe: Any) -> None:
            pipe.evalsha(self._find.sha, 1 + len(entries), lru, *entries, now_ms(), ttl_ms, *digests)

        (found,) = await self._run_with_script(self._find, build, key=lru)
        return int(found)

    async def get_prefix(self, model: str, digest: str) -> bytes | None:
        """The cached state record of one boundary; None when it is gone (evicted or expired since it was found)."""
        return await self.redis.get(self.keys.prefix_state(model, check_digest(digest)))

    async def put_prefix(self, model: str, digest: str, data: bytes | memoryview, *, ttl_ms: int,
                         max_bytes: int) -> int:
        """Stores a boundary's state record and evicts what no longer fits in `max_bytes` for the model (least
        recently used first; entries unused for a whole TTL before any). Returns how many entries went, or -1 when
        the record alone is larger than the bound (then nothing is stored). One round trip: the bytes go to a
        staging key with a plain SET and the script renames them, as a commit does."""
        size = len(data)
        if size > max_bytes:
            return -1
        entry = self.keys.prefix_state(model, check_digest(digest))
        lru, sizes, total = (self.keys.prefix_meta(model, part) for part in ("lru", "sizes", "bytes"))
        staging = self.keys.prefix_meta(model, f"staging:{secrets.token_hex(8)}")
        entry_prefix = self.keys.prefix_state(model, "")

        def build(pipe: Any) -> None:
            pipe.set(staging, data, px=_STAGING_TTL_MS)
            pipe.evalsha(self._put.sha, 5, lru, sizes, total, staging, entry, digest, now_ms(), ttl_ms, max_bytes,
                         size, entry_prefix)

        _, evicted = await self._run_with_script(self._put, build, key=lru)
        return int(evicted)

    async def prefix_usage(self, model: str) -> tuple[int, int]:
        """(entries, bytes) the model's prefix cache holds by its index (entries past their TTL included until the
        next put prunes them)."""
        lru, total = self.keys.prefix_meta(model, "lru"), self.keys.prefix_meta(model, "bytes")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(lru)
            pipe.get(total)
            count, size = await pipe.execute()
        return int(count), int(size or 0)
