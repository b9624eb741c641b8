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

Exactly-once turns: a commit that names its turn (the client's turn_id, and a digest of the turn's input) also
writes the turn's result (text, token ids, usage, new version, stop reason) to rwkv:{sid}:turn, in the same
script as the state, so the record exists iff the commit happened. That hash holds the session's latest committed
turn only (each commit overwrites it, a commit without a turn id deletes it: constant memory per session) and
expires after its own TTL (`turn_result_ttl_ms`, an hour by default). A begin with the same turn id and input
digest gets that record instead of the lease (begin_or_replay, still one round trip), before any version check:
a retry of a turn whose worker died between its commit and its turn_end is answered with the committed result,
never applied twice, never ABORTED. The key is fixed (not rwkv:{sid}:turn:<turn_id>), so a commit needs no
lookup of the previous record to drop it, and a client-chosen id never becomes part of a key name; it is still
checked (check_turn_id: 1-128 visible ASCII characters) before it is stored.

Durable commits: with `wait_replicas` > 0 (REDIS_WAIT_REPLICAS), the commit's pipeline ends with `WAIT n timeout`
on the same connection (still one round trip), and a replay runs one (after a write of its own, so that it covers
the commit whoever made it). Fewer acknowledgements than n: StoreUnavailable (UNAVAILABLE, retry in 1 s)
whose message names the committed version: the state IS committed on the master but not known to be on n
replicas; a retry with the same turn id gets the replay, which waits again. (A plain StoreUnavailable, not a
subclass: the front rebuilds errors by class name.)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from common.errors import (
    InvalidArgument,
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    StateCorrupt,
    StoreUnavailable,
    VersionConflict,
)
from common.store.base import StoreBase, check_name, now_ms, store_errors
from common.store.sessions import SessionMeta

STAGING_TTL_MS = 120_000  # a commit's staged bytes outlive a crashed worker by at most this
TURN_RESULT_TTL_MS = 3_600_000  # how long a committed turn's result stays replayable (a worker setting)
MAX_RECORD_TOKEN_IDS = 8192  # a longer reply's record keeps its text but not its token ids

_TURN_ID_RE = re.compile(r"^[!-~]{1,128}$")  # visible ASCII: UUIDs, ULIDs, "t1", ...
_DIGEST_RE = re.compile(r"^[0-9a-f]{16,64}$")


def check_turn_id(turn_id: str) -> str:
    """A client's turn id ('' = none) that may be stored: 1-128 visible ASCII characters; InvalidArgument else."""
    if turn_id and not _TURN_ID_RE.match(turn_id):
        raise InvalidArgument("a turn_id is 1-128 visible ASCII characters (no spaces)")
    return turn_id


@dataclass(frozen=True)
class Lease:
    """Proof that this holder may run a turn on the session until the lease expires."""

    session_id: str
    token: str
    ttl_ms: int


@dataclass(frozen=True)
class TurnRecord:
    """A committed turn's result, as a retry with the same turn id gets it back (rwkv:{sid}:turn).

    `turn_id` and `input_digest` say which turn it answers; `state_version` is the version the commit made (the
    store sets it); `token_ids` is empty when the reply had more than MAX_RECORD_TOKEN_IDS; `input_tokens` is what
    the turn's turn_start said (its input; prompt_tokens, the usage, also counts the template's closing tokens)."""

    turn_id: str
    input_digest: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    generated_tokens: int
    state_tokens: int
    stop_reason: int
    stop_string: str = ""
    stop_token_id: int = -1
    state_version: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the prefix cache covered

    def result_json(self) -> str:
        ids = list(self.token_ids) if len(self.token_ids) <= MAX_RECORD_TOKEN_IDS else []
        return json.dumps({
            "text": self.text, "ids": ids, "prompt": self.prompt_tokens, "generated": self.generated_tokens,
            "state_tokens": self.state_tokens, "version": self.state_version, "stop": self.stop_reason,
            "stop_string": self.stop_string, "stop_token": self.stop_token_id, "input": self.input_tokens,
            "cached": self.cached_tokens},
            separators=(",", ":"))

    @classmethod
    def from_json(cls, turn_id: str, input_digest: str, raw: bytes | str) -> TurnRecord:
        try:
            r = json.loads(raw)
            return cls(turn_id, input_digest, str(r["text"]), tuple(int(t) for t in r["ids"]), int(r["prompt"]),
                       int(r["generated"]), int(r["state_tokens"]), int(r["stop"]), str(r["stop_string"]),
                       int(r["stop_token"]), int(r["version"]), int(r["input"]), int(r.get("cached", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateCorrupt(f"unreadable turn record ({exc!r})") from None


# KEYS: meta, state, lease, turn record. ARGV: token, lease ms, turn id ('' = none), input digest. Returns the
# committed result {2, result JSON} when the session's last committed turn is this one (no lease taken; the
# session's TTL refreshed: a retry is a use), else takes the lease and refreshes the TTL, returning the meta
# hash: {1, {field, value, ...}} (acquired), {0} (busy), {-1} (no such session).
_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local ttl = redis.call('HGET', KEYS[1], 'ttl')
if ARGV[3] ~= '' then
  local done = redis.call('HMGET', KEYS[4], 'id', 'input', 'result')
  if done[1] == ARGV[3] and done[2] == ARGV[4] and done[3] then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
    return {2, done[3]}
  end
end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: meta. A write (the session's TTL refreshed) on the connection a replay's WAIT then runs on, so that the
# WAIT covers everything the master had written until then, the replayed commit included. Returns 1 (0: gone).
_TOUCH = """
local ttl = redis.call('HGET', KEYS[1], 'ttl')
if not ttl then return 0 end
return redis.call('PEXPIRE', KEYS[1], ttl)
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

# KEYS: meta, state, lease, staging, turn record, kept-versions hash, then the kept state keys: :state:v<E> (where
# the current state goes), :state:v<E - keep> (the one that falls out), the others still kept (their TTLs refreshed).
# ARGV: token, expected version E, now ms, state tokens, turns added, turn id ('' = none), input digest, result
# JSON, record ms, keep (the session's keep_versions).
# Branching (keep > 0): the state being replaced is renamed (same hash tag, no copy) to :state:v<E> with its token
# and turn counts in the kept hash, and the oldest beyond keep is deleted, atomically with the commit.
# Compare-and-set, then the lease goes (once its token is checked to be ours) whatever the outcome. RENAME is
# O(1) whatever the state's size. On success the turn's record replaces the previous one (or, for a turn
# without an id, the previous one goes). Returns {new version} or {-1} (lease lost), {-2} (session gone),
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
local keep = tonumber(ARGV[10])
if keep > 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], KEYS[7])
    local old = redis.call('HMGET', KEYS[1], 'tokens', 'turns')
    redis.call('HSET', KEYS[6], version, (old[1] or '0') .. ' ' .. (old[2] or '0'))
  end
  redis.call('DEL', KEYS[8])
  redis.call('HDEL', KEYS[6], tonumber(version) - keep)
end
redis.call('RENAME', KEYS[4], KEYS[2])
redis.call('HSET', KEYS[1], 'version', new_version, 'updated', ARGV[3], 'tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'turns', ARGV[5])
local ttl = redis.call('HGET', KEYS[1], 'ttl')
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
for i = 6, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[5], 'id', ARGV[6], 'input', ARGV[7], 'result', ARGV[8])
  redis.call('PEXPIRE', KEYS[5], ARGV[9])
else
  redis.call('DEL', KEYS[5])
end
return {new_version}
"""


@store_errors
class TurnProtocol(StoreBase):
    """Leases and compare-and-set commits of a session's state."""

    def __init__(self, client: Any, prefix: str = "rwkv") -> None:
        super().__init__(client, prefix)
        self._begin = client.register_script(_BEGIN)
        self._touch = client.register_script(_TOUCH)
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
        begun = await self.begin_or_replay(sid, ttl_ms, holder, with_state=with_state)
        assert not isinstance(begun, TurnRecord)  # no turn id: never a replay
        return begun

    async def begin_or_replay(self, sid: str, ttl_ms: int, holder: str = "", *, with_state: bool = True,
                              turn_id: str = "", input_digest: str = ""
                              ) -> tuple[Lease, SessionMeta, bytes | None] | TurnRecord:
        """begin_turn for a turn named by the client's `turn_id` (and the digest of its input): when the
        session's last committed turn is this one, its TurnRecord instead (no lease taken, no version checked;
        still one round trip, plus a WAIT when wait_replicas > 0, which raises StoreUnavailable when the
        replicas do not confirm the commit in time)."""
        check_turn_id(turn_id)
        if turn_id and not _DIGEST_RE.match(input_digest):
            raise InvalidArgument("a named turn needs the hex digest of its input")
        token = secrets.token_hex(16)
        lease = Lease(sid, f"{check_name('lease holder', holder)}|{token}" if holder else token, ttl_ms)
        meta_key, state_key, lease_key = self.keys.session_keys(sid)
        record_key = self.keys.session(sid, "turn")

        def build(pipe: Any) -> None:
            pipe.evalsha(self._begin.sha, 4, meta_key, state_key, lease_key, record_key, lease.token, ttl_ms,
                         turn_id, input_digest if turn_id else "")
            if with_state:
                pipe.get(state_key)

        result, *data = await self._run_with_script(self._begin, build, key=meta_key)
        if result[0] == -1:
            raise SessionNotFound(f"session {sid} not found")
        if result[0] == 0:
            raise SessionBusy(f"session {sid} is running another turn")
        if result[0] == 2:
            record = TurnRecord.from_json(turn_id, input_digest, result[1])
            if self.wait_replicas > 0:
                await self._replicated(sid, record.state_version)
            return record
        fields = result[1]
        meta = SessionMeta.from_hash(sid, dict(zip(fields[::2], fields[1::2])))
        return lease, meta, (data[0] if data and meta.version > 0 else None)

    async def _replicated(self, sid: str, version: int) -> None:
        """WAITs (after a write of this connection's own) until wait_replicas replicas hold what the master had
        written so far, the commit of `version` included; StoreUnavailable when they do not within the timeout."""
        meta_key = self.keys.session(sid, "meta")

        def build(pipe: Any) -> None:
            pipe.evalsha(self._touch.sha, 1, meta_key)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)

        _, acked = await self._run_with_script(self._touch, build, key=meta_key)
        self._check_acked(sid, version, int(acked))

    def _check_acked(self, sid: str, version: int, acked: int) -> None:
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"session {sid} is committed at version {version} on the Redis master, but only {acked} of the "
                f"{self.wait_replicas} required replicas acknowledged it within {self.wait_timeout_ms} ms: retry "
                "the turn with the same turn_id (it is answered from the commit, not run again)", retry_after_s=1.0)

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
        self, lease: Lease, expected_version: int, data: bytes, *, state_tokens: int, turns: int = 1,
        record: TurnRecord | None = None, record_ttl_ms: int = TURN_RESULT_TTL_MS, keep_versions: int = 0,
    ) -> int:
        """Stores data as the state at expected_version + 1 if the lease is still held and nobody committed
        since expected_version (compare-and-set), and lets the lease go whatever the outcome, if it was still
        this holder's. Returns the new version; LeaseLost / VersionConflict / SessionNotFound otherwise, and the
        stored state is untouched. When this raises StoreUnavailable the commit may or may not have happened:
        release_lease stays safe to call.

        `record` (a turn with a turn id): stored atomically with the state as the session's latest turn, with
        state_version set to the new version, replayable for `record_ttl_ms`. Without one the previous record
        goes. `keep_versions` (the session's): the replaced state stays readable as a kept version (sessions.py
        fork_session(state_version=...)), the oldest beyond it goes. With wait_replicas > 0 the pipeline ends with
        a WAIT: StoreUnavailable (UNAVAILABLE) when too few
        replicas acknowledge in time, although the master holds the commit.

        One round trip: the bytes go to a staging key with a plain SET (no copy through Lua), then the script
        renames it onto the state if the checks pass. (Repeating both, as on NOSCRIPT, is safe: the SET rewrites
        the same staging key, the script has not run, and WAIT only waits.)"""
        sid = lease.session_id
        meta_key, state_key, lease_key = self.keys.session_keys(sid)
        staging = self.keys.session(sid, f"staging:{lease.token}")
        record_key = self.keys.session(sid, "turn")
        turn_args: tuple[Any, ...] = ("", "", "", record_ttl_ms)
        if record is not None and record.turn_id:
            check_turn_id(record.turn_id)
            if not _DIGEST_RE.match(record.input_digest):
                raise InvalidArgument("a turn record needs the hex digest of its input")
            stored = replace(record, state_version=expected_version + 1)
            turn_args = (record.turn_id, record.input_digest, stored.result_json(), record_ttl_ms)
        wait = self.wait_replicas
        kept = [self.keys.kept_state(sid, v) for v in
                (expected_version, expected_version - keep_versions,
                 *range(expected_version - 1, expected_version - keep_versions, -1))] if keep_versions > 0 else []
        keys = [meta_key, state_key, lease_key, staging, record_key, self.keys.session(sid, "kept"), *kept]

        def build(pipe: Any) -> None:
            pipe.set(staging, data, px=STAGING_TTL_MS)
            pipe.evalsha(self._commit.sha, len(keys), *keys, lease.token, expected_version, now_ms(), state_tokens,
                         turns, *turn_args, keep_versions)
            if wait > 0:
                pipe.execute_command("WAIT", wait, self.wait_timeout_ms)

        _, result, *acked = await self._run_with_script(self._commit, build, key=meta_key)
        if result[0] == -1:
            raise LeaseLost(f"lease on session {sid} was lost; state not committed")
        if result[0] == -2:
            raise SessionNotFound(f"session {sid} was deleted; state not committed")
        if result[0] == -3:
            raise VersionConflict(f"session {sid} is at version {result[1]}, not {expected_version}")
        if result[0] == -4:
            raise LeaseLost(f"staged state of session {sid} expired before the commit")
        version = int(result[0])
        if wait > 0:
            self._check_acked(sid, version, int(acked[0]))
        return version
