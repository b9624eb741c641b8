"""The Redis state store against a real redis-server: CAS commits, leases, forks, TTLs, registry."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import (
    InvalidArgument,
    LeaseLost,
    PresetNotFound,
    SessionBusy,
    SessionNotFound,
    VersionConflict,
)
from common.store import Lease, StateStore
from common.store.turns import TurnRecord
from common.worker_api import ModelDescription, WorkerLoad

STATE_A = b"state-a" * 1000
STATE_B = b"state-b" * 1000


async def new_session(store: StateStore, tenant: str = "t1", ttl_ms: int = 60_000, **kw) -> str:
    meta = await store.create_session(tenant=tenant, model="tiny", template="chat", ttl_ms=ttl_ms, **kw)
    return meta.session_id


async def lease(store: StateStore, sid: str, ttl_ms: int = 5_000) -> Lease:
    """Starts a turn the way a worker does (begin_turn) and keeps only its lease."""
    return (await store.begin_turn(sid, ttl_ms, with_state=False))[0]


async def commit(store: StateStore, sid: str, data: bytes, version: int) -> int:
    return await store.commit_and_release(await lease(store, sid), version, data, state_tokens=len(data))


async def test_create_get_roundtrip(store: StateStore) -> None:
    meta = await store.create_session(
        tenant="t1", model="tiny", template="one-state", ttl_ms=60_000, system_prompt="Be brief.",
        metadata={"user": "ann"}, sampling={"temperature": 0.0},
    )
    got = await store.get_session(meta.session_id)
    assert got == meta
    assert got.version == 0 and got.template == "one-state" and got.sampling == {"temperature": 0.0}
    assert (await store.load_state(meta.session_id))[1] is None


async def test_commit_advances_version_and_stores_bytes(store: StateStore) -> None:
    sid = await new_session(store)
    assert await commit(store, sid, STATE_A, 0) == 1
    assert await commit(store, sid, STATE_B, 1) == 2
    meta, data = await store.load_state(sid)
    assert (meta.version, meta.turns, meta.state_tokens, data) == (2, 2, len(STATE_B), STATE_B)


async def test_commit_refuses_stale_version(store: StateStore) -> None:
    sid = await new_session(store)
    await commit(store, sid, STATE_A, 0)
    held = await lease(store, sid)
    with pytest.raises(VersionConflict):
        await store.commit_and_release(held, 0, STATE_B, state_tokens=1)  # someone already committed version 1
    meta, data = await store.load_state(sid)
    assert (meta.version, data) == (1, STATE_A)
    # the rejected commit's staging key and the lease are gone: nothing but meta and state remain
    keys = {k.decode() async for k in store.redis.scan_iter(match="*")} - {"rwkv:tenant:t1:sessions"}
    assert keys == {store.keys.session(sid, p) for p in ("meta", "state")}


async def test_stale_worker_with_expired_lease_cannot_overwrite(store: StateStore) -> None:
    sid = await new_session(store)
    slow = await lease(store, sid, 100)
    await asyncio.sleep(0.25)  # the slow worker's lease expires...
    fast = await lease(store, sid)  # ...another worker takes over
    with pytest.raises(LeaseLost):
        await store.commit_and_release(slow, 0, STATE_A, state_tokens=1)
    assert not await store.release_lease(slow)  # a lost lease leaves the new holder's alone
    assert await store.commit_and_release(fast, 0, STATE_B, state_tokens=2) == 1
    third = await lease(store, sid)  # while a third turn holds the session...
    with pytest.raises(LeaseLost):  # ...even at the right version, a lost lease never commits
        await store.commit_and_release(slow, 1, STATE_A, state_tokens=1)
    assert (await store.load_state(sid))[1] == STATE_B
    assert await store.release_lease(third)  # the stale commit did not release the new holder's lease


async def test_lease_is_exclusive_renewable_and_released(store: StateStore) -> None:
    sid = await new_session(store)
    held = await lease(store, sid, 300)
    with pytest.raises(SessionBusy):
        await lease(store, sid, 300)
    await asyncio.sleep(0.2)
    await store.renew_lease(held)
    await asyncio.sleep(0.2)  # past the original expiry, within the renewed one
    with pytest.raises(SessionBusy):
        await lease(store, sid, 300)
    assert await store.release_lease(held)
    again = await lease(store, sid, 300)
    with pytest.raises(LeaseLost):
        await store.renew_lease(held)
    await store.release_lease(again)


async def test_concurrent_acquires_admit_exactly_one(store: StateStore) -> None:
    sid = await new_session(store)
    results = await asyncio.gather(*(lease(store, sid) for _ in range(20)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, SessionBusy) for r in results if isinstance(r, Exception))


async def test_unknown_session(store: StateStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.get_session("nosuchsession")
    with pytest.raises(SessionNotFound):
        await lease(store, "nosuchsession", 1000)
    with pytest.raises(InvalidArgument):
        await store.get_session("bad{id}")
    sid = await new_session(store)
    held = await lease(store, sid)
    await store.delete_session(sid)
    with pytest.raises(SessionNotFound):
        await store.commit_and_release(held, 0, STATE_A, state_tokens=1)
    with pytest.raises(SessionNotFound):
        await store.delete_session(sid)


async def test_deleting_a_session_removes_every_key_it_owns(store: StateStore) -> None:
    sid = await new_session(store)
    record = TurnRecord("t-1", "d" * 64, "hi", (1, 2), 3, 2, 5, 1)
    held = await lease(store, sid)
    await store.commit_and_release(held, 0, STATE_A, state_tokens=5, record=record)
    assert await store.redis.exists(store.keys.session(sid, "turn"))  # the last turn's result, for its retries
    await store.delete_session(sid)
    assert [k async for k in store.redis.scan_iter(match=f"rwkv:{{{sid}}}*")] == []


async def test_fork_copies_state_and_evolves_independently(store: StateStore) -> None:
    sid = await new_session(store, metadata={"k": "v"})
    await commit(store, sid, STATE_A, 0)
    fork = await store.fork_session(sid, metadata={"k": "fork"})
    assert fork.forked_from == sid and fork.version == 1 and fork.metadata == {"k": "fork"}
    assert fork.session_id.split(".")[0] == sid  # same hash-tag family: one cluster slot
    assert (await store.load_state(fork.session_id))[1] == STATE_A
    await commit(store, fork.session_id, STATE_B, 1)
    assert (await store.load_state(sid))[1] == STATE_A
    assert (await store.load_state(fork.session_id))[1] == STATE_B
    fork2 = await store.fork_session(fork.session_id)  # a fork of a fork stays in the family
    assert fork2.session_id.split(".")[0] == sid and (await store.load_state(fork2.session_id))[1] == STATE_B
    with pytest.raises(VersionConflict):
        await store.fork_session(sid, expected_version=0)
    with pytest.raises(SessionNotFound):
        await store.fork_session("nosuchsession")


async def test_ttl_is_refreshed_on_use(store: StateStore) -> None:
    sid = await new_session(store, ttl_ms=600)
    await commit(store, sid, STATE_A, 0)
    meta_key, state_key = store.keys.session(sid, "meta"), store.keys.session(sid, "state")
    await asyncio.sleep(0.4)
    assert 0 < await store.redis.pttl(meta_key) <= 250
    held = await lease(store, sid, 1000)  # starting a turn is a use
    assert await store.redis.pttl(meta_key) > 450 and await store.redis.pttl(state_key) > 450
    await store.release_lease(held)
    await asyncio.sleep(0.8)
    with pytest.raises(SessionNotFound):
        await store.get_session(sid)
    assert await store.redis.exists(state_key) == 0


async def test_list_sessions_pages_and_prunes_expired(store: StateStore) -> None:
    sids = [await new_session(store) for _ in range(5)]
    short = await new_session(store, ttl_ms=50)
    other = await store.create_session(tenant="t1", model="big", template="chat", ttl_ms=60_000)
    await new_session(store, tenant="t2")
    await asyncio.sleep(0.1)
    seen, token = [], ""
    while True:
        page, token = await store.list_sessions("t1", page_size=2, page_token=token, model="tiny")
        seen += [m.session_id for m in page]
        if not token:
            break
    assert sorted(seen) == sorted(sids) and short not in seen and other.session_id not in seen
    everything, token = await store.list_sessions("t1", page_size=100)
    assert token == "" and len(everything) == 6
    assert await store.redis.zcard("rwkv:tenant:t1:sessions") == 6  # the expired one was pruned


async def test_presets_and_prefix_cache(store: StateStore) -> None:
    await store.put_preset("tiny", "pirate", STATE_A)
    assert await store.get_preset("tiny", "pirate") == STATE_A
    assert await store.list_presets("tiny") == ["pirate"]
    with pytest.raises(PresetNotFound):
        await store.get_preset("tiny", "ninja")
    digests = ["ab" * 32, "cd" * 32]
    assert await store.find_prefix("tiny", digests, 1000) == 0
    assert await store.put_prefix("tiny", "ab" * 32, STATE_B, ttl_ms=1000, max_bytes=1 << 20) == 0
    assert await store.find_prefix("tiny", digests, 1000) == 1  # the longest cached boundary, in one round trip
    assert await store.get_prefix("tiny", "ab" * 32) == STATE_B


async def test_worker_registry_expires_dead_workers(store: StateStore) -> None:
    def load(worker_id: str, port: int, model: str) -> WorkerLoad:
        return WorkerLoad(worker_id, f"127.0.0.1:{port}", ModelDescription(model, 2, 64, 1, 65536, 1000, "ab", True))

    await store.register_worker(load("w1", 1, "tiny"), 5_000)
    await store.register_worker(load("w2", 2, "tiny"), 50)
    await store.register_worker(load("w3", 3, "big"), 5_000)
    await asyncio.sleep(0.1)
    assert await store.list_workers("tiny") == [load("w1", 1, "tiny")]  # what was written is what is read
    await store.unregister_worker("w1")
    assert [w.model.id for w in await store.list_workers()] == ["big"]
    await store.redis.set("rwkv:worker:w4", b'{"address": "127.0.0.1:4"}')  # not a record any worker writes
    await store.redis.sadd("rwkv:workers", "w4")
    assert [w.worker_id for w in await store.list_workers()] == ["w3"]  # skipped, not fatal


async def test_a_connection_torn_down_under_a_call_is_the_store_unavailable(store: StateStore, monkeypatch) -> None:
    """redis-py lets a bare AttributeError out when a connection is disconnected while a command is being sent (a
    Cluster failover does that to shared connections; redis/redis-py#4287): the caller sees StoreUnavailable, a
    retryable UNAVAILABLE, and the store works again on the next call. The fault is caused for real inside redis-py
    (its own disconnect() on the connection in use), only its timing is forced. A TypeError of the store's own
    making stays a bug."""
    from redis.asyncio.connection import Connection

    from common.errors import StoreUnavailable

    sid = await new_session(store)
    send = Connection._send_packed_command

    async def torn(self: Connection, command) -> None:
        await self.disconnect()  # what a concurrent failover does to the connection in use
        await send(self, command)

    monkeypatch.setattr(Connection, "_send_packed_command", torn)
    with pytest.raises(StoreUnavailable, match="closed under a call"):
        await store.get_session(sid)
    monkeypatch.undo()
    assert (await store.get_session(sid)).session_id == sid
    with pytest.raises(TypeError):
        await store.get_session(12345)  # not a str: the store's own TypeError, not a connection
