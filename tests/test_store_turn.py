"""The store's two-round-trip turn path: begin_turn (lease + meta + state) and commit_and_release."""

from __future__ import annotations

import pytest

from common.errors import LeaseLost, SessionBusy, SessionNotFound, VersionConflict
from common.store import StateStore

STATE_A = b"state-a" * 1000
STATE_B = b"state-b" * 1000


async def new_session(store: StateStore) -> str:
    return (await store.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)).session_id


async def test_begin_commit_release_round(store: StateStore) -> None:
    sid = await new_session(store)
    lease, meta, data = await store.begin_turn(sid, 5_000, holder="w1")
    assert (meta.version, meta.model, data) == (0, "tiny", None)
    with pytest.raises(SessionBusy):
        await store.begin_turn(sid, 5_000)
    assert await store.commit_and_release(lease, 0, STATE_A, state_tokens=7) == 1
    assert not await store.redis.exists(store.keys.session(sid, "lease"))  # released by the commit
    lease, meta, data = await store.begin_turn(sid, 5_000)
    assert (meta.version, meta.state_tokens, meta.turns, data) == (1, 7, 1, STATE_A)
    assert await store.commit_and_release(lease, 1, STATE_B, state_tokens=9) == 2
    lease, meta, data = await store.begin_turn(sid, 5_000, with_state=False)  # a worker betting on its cache
    assert (meta.version, data) == (2, None)
    assert await store.release_lease(lease)
    with pytest.raises(SessionNotFound):
        await store.begin_turn("nosuchsession", 1000)


async def test_commit_and_release_keeps_the_guarantees(store: StateStore) -> None:
    sid = await new_session(store)
    lease, _, _ = await store.begin_turn(sid, 5_000)
    with pytest.raises(VersionConflict):  # wrong expected version: nothing stored, the lease let go
        await store.commit_and_release(lease, 3, STATE_A, state_tokens=1)
    assert (await store.load_state(sid))[1] is None
    assert not await store.redis.exists(store.keys.session(sid, "lease"))
    stale, _, _ = await store.begin_turn(sid, 5_000)
    await store.redis.delete(store.keys.session(sid, "lease"))  # its lease broken, another worker commits
    fresh, _, _ = await store.begin_turn(sid, 5_000)
    assert await store.commit_and_release(fresh, 0, STATE_B, state_tokens=2) == 1
    newer, _, _ = await store.begin_turn(sid, 5_000)
    with pytest.raises(LeaseLost):  # the stale worker neither overwrites the state nor frees the new holder
        await store.commit_and_release(stale, 0, STATE_A, state_tokens=1)
    assert (await store.load_state(sid))[1] == STATE_B
    assert await store.release_lease(newer)
    assert not [k async for k in store.redis.scan_iter(match="*staging*")]


async def test_scripts_reload_after_flush(store: StateStore) -> None:
    sid = await new_session(store)
    await store.redis.script_flush()
    lease, meta, _ = await store.begin_turn(sid, 5_000)
    await store.redis.script_flush()
    assert await store.commit_and_release(lease, meta.version, STATE_A, state_tokens=1) == 1
    assert (await store.load_state(sid))[1] == STATE_A
