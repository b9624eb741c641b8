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
from common.store import StateStore

STATE_A = b"state-a" * 1000
STATE_B = b"state-b" * 1000


async def new_session(store: StateStore, tenant: str = "t1", ttl_ms: int = 60_000, **kw) -> str:
    meta = await store.create_session(tenant=tenant, model="tiny", template="chat", ttl_ms=ttl_ms, **kw)
    return meta.session_id


async def commit(store: StateStore, sid: str, data: bytes, version: int) -> int:
    lease = await store.acquire_lease(sid, 5_000)
    try:
        return await store.commit_state(lease, version, data, state_tokens=len(data))
    finally:
        await store.release_lease(lease)


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
    lease = await store.acquire_lease(sid, 5_000)
    with pytest.raises(VersionConflict):
        await store.commit_state(lease, 0, STATE_B, state_tokens=1)  # someone already committed version 1
    meta, data = await store.load_state(sid)
    assert (meta.version, data) == (1, STATE_A)
    # the rejected commit's staging key is gone: nothing but meta, state and the lease remain
    keys = {k.decode() async for k in store.redis.scan_iter(match="*")} - {f"rwkv:tenant:t1:sessions"}
    assert keys == {store.session_key(sid, p) for p in ("meta", "state", "lease")}


async def test_stale_worker_with_expired_lease_cannot_overwrite(store: StateStore) -> None:
    sid = await new_session(store)
    slow = await store.acquire_lease(sid, 100)
    await asyncio.sleep(0.25)  # the slow worker's lease expires...
    fast = await store.acquire_lease(sid, 5_000)  # ...another worker takes over and commits
    assert await store.commit_state(fast, 0, STATE_B, state_tokens=2) == 1
    with pytest.raises(LeaseLost):
        await store.commit_state(slow, 0, STATE_A, state_tokens=1)
    with pytest.raises(LeaseLost):  # even at the right version, a lost lease never commits
        await store.commit_state(slow, 1, STATE_A, state_tokens=1)
    assert (await store.load_state(sid))[1] == STATE_B
    assert not await store.release_lease(slow)  # releasing a lost lease leaves the new holder's alone
    assert await store.release_lease(fast)


async def test_lease_is_exclusive_renewable_and_released(store: StateStore) -> None:
    sid = await new_session(store)
    lease = await store.acquire_lease(sid, 300)
    with pytest.raises(SessionBusy):
        await store.acquire_lease(sid, 300)
    await asyncio.sleep(0.2)
    await store.renew_lease(lease)
    await asyncio.sleep(0.2)  # past the original expiry, within the renewed one
    with pytest.raises(SessionBusy):
        await store.acquire_lease(sid, 300)
    assert await store.release_lease(lease)
    again = await store.acquire_lease(sid, 300)
    with pytest.raises(LeaseLost):
        await store.renew_lease(lease)
    await store.release_lease(again)


async def test_concurrent_acquires_admit_exactly_one(store: StateStore) -> None:
    sid = await new_session(store)
    results = await asyncio.gather(*(store.acquire_lease(sid, 5_000) for _ in range(20)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, SessionBusy) for r in results if isinstance(r, Exception))


async def test_unknown_session(store: StateStore) -> None:
    with pytest.raises(SessionNotFound):
        await store.get_session("nosuchsession")
    with pytest.raises(SessionNotFound):
        await store.acquire_lease("nosuchsession", 1000)
    with pytest.raises(InvalidArgument):
        await store.get_session("bad{id}")
    sid = await new_session(store)
    lease = await store.acquire_lease(sid, 5_000)
    await store.delete_session(sid)
    with pytest.raises(SessionNotFound):
        await store.commit_state(lease, 0, STATE_A, state_tokens=1)
    with pytest.raises(SessionNotFound):
        await store.delete_session(sid)


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
    meta_key, state_key = store.session_key(sid, "meta"), store.session_key(sid, "state")
    await asyncio.sleep(0.4)
    assert 0 < await store.redis.pttl(meta_key) <= 250
    lease = await store.acquire_lease(sid, 1000)  # starting a turn is a use
    assert await store.redis.pttl(meta_key) > 450 and await store.redis.pttl(state_key) > 450
    await store.release_lease(lease)
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
    assert await store.get_prefix("tiny", "ab" * 32, 1000) is None
    await store.put_prefix("tiny", "ab" * 32, STATE_B, 1000)
    assert await store.get_prefix("tiny", "ab" * 32, 1000) == STATE_B


async def test_worker_registry_expires_dead_workers(store: StateStore) -> None:
    await store.register_worker("w1", {"address": "127.0.0.1:1", "model": "tiny"}, 5_000)
    await store.register_worker("w2", {"address": "127.0.0.1:2", "model": "tiny"}, 50)
    await store.register_worker("w3", {"address": "127.0.0.1:3", "model": "big"}, 5_000)
    await asyncio.sleep(0.1)
    assert [w["address"] for w in await store.list_workers("tiny")] == ["127.0.0.1:1"]
    await store.unregister_worker("w1")
    assert [w["model"] for w in await store.list_workers()] == ["big"]
