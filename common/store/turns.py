"""The turn protocol: lease -> begin (lease + meta + state in one round trip) -> compare-and-set commit -> release.

Why a stale worker never overwrites a newer state:
- One turn at a time: a turn holds the session's lease, a random token under `SET NX PX`. Only its holder can
  renew or release it (the scripts compare the token), and it expires by itself when the holder dies.
- The commit is one Lua script, so its checks and its write are atomic: the staged bytes become the state
  only if the lease is still this holder's token AND the stored version is the one the turn started from.
  A worker whose lease expired (a long pause, a partition) fails the first check; a worker that lost a race
  to another commit fails the second. Either way the stored state is untouched and the turn gets
  LeaseLost / VersionConflict (ABORTED).
- Breaking a lease (the front saw its worker die) only deletes it; if that worker lives on after all, its
  commit fails the token check like any stale holder's.
A turn costs two round trips: begin_turn, then commit_and_release.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.errors import LeaseLost, SessionBusy, SessionNotFound, VersionConflict
from common.store.base import StoreBase, check_name, now_ms, store_errors
from common.store.sessions import SessionMeta

STAGING_TTL_MS = 120_000  # a commit's staged bytes outlive a crashed worker by at most this


@dataclass(frozen=True)
class Lease:
    """Proof that this holder may run a turn on the session until the lease expires."""

    session_id: str
    token: str
    ttl_ms: int


# KEYS: meta, state, lease. ARGV: token, lease ms. Takes the lease and refreshes the session's TTL (a turn is a
# use), returning the meta hash: {1, {field, value, ...}} (acquired), {0} (busy), {-1} (no such session).
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

# KEYS: meta, state, lease, staging. ARGV: token, expected version, now ms, state tokens, turns added.
# Compare-and-set, then the lease goes (once its token is checked to be ours) whatever the outcome. RENAME is
# O(1) whatever the state's size. Returns {new version} or {-1} (lease lost), {-2} (session gone),
# {-3, current version}, {-4} (staging gone).
_COMMIT = """
local ours = redis.call('GET', KEYS[3]) == ARGV[1]
if ours then redis.call('DEL', KEYS[3]) end
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


@store_errors
class TurnProtocol(StoreBase):
    """Leases and compare-and-set commits of a session's state."""

    def __init__(self, client: aioredis.Redis, prefix: str = "rwkv") -> None:
        super().__init__(client, prefix)
        self._begin = client.register_script(_BEGIN)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._break = client.register_script(_BREAK)
        self._commit = client.register_script(_COMMIT)

    async def begin_turn(self, sid: str, ttl_ms: int, holder: str = "", *, with_state: bool = True
                         ) -> tuple[Lease, SessionMeta, bytes | None]:
        """Takes the session's lease, refreshes its TTL and reads its meta (+ the state bytes when with_state),
        in one round trip. SessionNotFound when unknown, SessionBusy when another turn holds the lease.

        `holder` (a worker id) prefixes the token, so that break_lease can free the lease of a dead holder.
        The lease script and a GET of the state are pipelined: the GET runs right after the script, while this
        caller holds the lease, so no commit can come between them (every commit checks the lease token) and the
        bytes are those of meta.version. Without with_state (a caller that expects its local cache to hit), or
        at version 0, the bytes are None."""
        token = secrets.token_hex(16)
        lease = Lease(sid, f"{check_name('lease holder', holder)}|{token}" if holder else token, ttl_ms)
        meta_key, state_key, lease_key = self.keys.session_keys(sid)

        def build(pipe: Any) -> None:
            pipe.evalsha(self._begin.sha, 3, meta_key, state_key, lease_key, lease.token, ttl_ms)
            if with_state:
                pipe.get(state_key)

        result, *data = await self._run_with_script(self._begin, build, key=meta_key)
        if result[0] == -1:
            raise SessionNotFound(f"session {sid} not found")
        if result[0] == 0:
            raise SessionBusy(f"session {sid} is running another turn")
        fields = result[1]
        meta = SessionMeta.from_hash(sid, dict(zip(fields[::2], fields[1::2])))
        return lease, meta, (data[0] if data and meta.version > 0 else None)

    async def load_state(self, sid: str) -> tuple[SessionMeta, bytes | None]:
        """A consistent snapshot of the metadata and the state bytes (None at version 0), for a holder whose
        begin_turn skipped the bytes and then missed its cache."""
        meta_key, state_key, _ = self.keys.session_keys(sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(meta_key)
            pipe.get(state_key)
            raw, data = await pipe.execute()
        if not raw:
            raise SessionNotFound(f"session {sid} not found")
        return SessionMeta.from_hash(sid, raw), data

    async def get_version(self, sid: str) -> int:
        """The stored state's version (cheap: lets a caller check what a turn left behind)."""
        version = await self.redis.hget(self.keys.session(sid, "meta"), "version")
        if version is None:
            raise SessionNotFound(f"session {sid} not found")
        return int(version)

    async def renew_lease(self, lease: Lease) -> None:
        """Extends the lease by its TTL; LeaseLost when it expired or was taken over."""
        if not await self._renew(keys=[self.keys.session(lease.session_id, "lease")], args=[lease.token,
                                                                                              lease.ttl_ms]):
            raise LeaseLost(f"lease on session {lease.session_id} was lost")

    async def release_lease(self, lease: Lease) -> bool:
        """Releases the lease if still held; False when it had already expired or changed hands."""
        return bool(await self._release(keys=[self.keys.session(lease.session_id, "lease")], args=[lease.token]))

    async def break_lease(self, sid: str, holder: str) -> bool:
        """Deletes the session's lease if `holder` took it (the caller saw that worker die). Safe even if the
        holder lives on: its commit then fails the compare-and-set (LeaseLost) and its turn ends."""
        prefix = f"{check_name('lease holder', holder)}|"
        return bool(await self._break(keys=[self.keys.session(sid, "lease")], args=[prefix]))

    async def commit_and_release(
        self, lease: Lease, expected_version: int, data: bytes, *, state_tokens: int, turns: int = 1
    ) -> int:
        """Stores data as the state at expected_version + 1 if the lease is still held and nobody committed
        since expected_version (compare-and-set), and lets the lease go whatever the outcome, if it was still
        this holder's. Returns the new version; LeaseLost / VersionConflict / SessionNotFound otherwise, and the
        stored state is untouched. When this raises StoreUnavailable the commit may or may not have happened:
        release_lease stays safe to call.

        One round trip: the bytes go to a staging key with a plain SET (no copy through Lua), then the script
        renames it onto the state if the checks pass. (Repeating both, as on NOSCRIPT, is safe: the SET rewrites
        the same staging key, and the script has not run.)"""
        sid = lease.session_id
        meta_key, state_key, lease_key = self.keys.session_keys(sid)
        staging = self.keys.session(sid, f"staging:{lease.token}")

        def build(pipe: Any) -> None:
            pipe.set(staging, data, px=STAGING_TTL_MS)
            pipe.evalsha(self._commit.sha, 4, meta_key, state_key, lease_key, staging, lease.token,
                         expected_version, now_ms(), state_tokens, turns)

        _, result = await self._run_with_script(self._commit, build, key=meta_key)
        if result[0] == -1:
            raise LeaseLost(f"lease on session {sid} was lost; state not committed")
        if result[0] == -2:
            raise SessionNotFound(f"session {sid} was deleted; state not committed")
        if result[0] == -3:
            raise VersionConflict(f"session {sid} is at version {result[1]}, not {expected_version}")
        if result[0] == -4:
            raise LeaseLost(f"staged state of session {sid} expired before the commit")
        return int(result[0])
