"""The store's two-round-trip turn path: begin_turn (lease + meta + state) and commit_and_release; the committed
turn's record that a retry with the same turn id gets back (begin_or_replay)."""

from __future__ import annotations

import asyncio

import pytest

from common.errors import InvalidArgument, LeaseLost, SessionBusy, SessionNotFound, VersionConflict
from common.store import StateStore
from common.store.turns import TurnRecord, check_turn_id

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


# ---- exactly-once turns: the committed turn's record ---------------------------------------------------------

DIGEST = "ab" * 16


def record(turn_id: str, text: str = "hello", digest: str = DIGEST) -> TurnRecord:
    return TurnRecord(turn_id, digest, text, (5, 6, 7), prompt_tokens=4, generated_tokens=3, state_tokens=11,
                      stop_reason=3, stop_string="", stop_token_id=-1, input_tokens=2)


async def test_a_retried_begin_with_the_committed_turn_id_gets_the_record(store: StateStore) -> None:
    sid = await new_session(store)
    begun = await store.begin_or_replay(sid, 5_000, "w1", turn_id="t-1", input_digest=DIGEST)
    lease, meta, _ = begun
    assert await store.commit_and_release(lease, 0, STATE_A, state_tokens=11, record=record("t-1")) == 1
    # The same turn again (its worker died before turn_end): the record, no lease, whatever version it expected.
    replay = await store.begin_or_replay(sid, 5_000, "w2", turn_id="t-1", input_digest=DIGEST)
    assert replay == TurnRecord("t-1", DIGEST, "hello", (5, 6, 7), 4, 3, 11, 3, "", -1, state_version=1,
                                input_tokens=2)
    assert not await store.redis.exists(store.keys.session(sid, "lease"))
    assert (await store.get_session(sid)).version == 1
    # A different turn id, or the same id with another input, is a new turn.
    lease, meta, data = await store.begin_or_replay(sid, 5_000, turn_id="t-2", input_digest=DIGEST)
    assert (meta.version, data) == (1, STATE_A)
    with pytest.raises(SessionBusy):  # a new turn takes the lease as ever...
        await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest="cd" * 16)
    # ...but the committed turn is still answered while another turn runs
    assert (await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)).text == "hello"
    assert await store.release_lease(lease)


async def test_the_record_goes_with_the_next_commit(store: StateStore) -> None:
    sid = await new_session(store)
    lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)
    await store.commit_and_release(lease, 0, STATE_A, state_tokens=1, record=record("t-1", "first"))
    lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-2", input_digest=DIGEST)
    await store.commit_and_release(lease, 1, STATE_B, state_tokens=2, record=record("t-2", "second"))
    assert (await store.begin_or_replay(sid, 5_000, turn_id="t-2", input_digest=DIGEST)).state_version == 2
    # Only the latest turn is kept (a retry can only be of the last one): t-1 now runs as a new turn.
    lease, meta, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)
    assert meta.version == 2
    # A commit without a turn id drops the record: nothing describes the latest turn any more.
    await store.commit_and_release(lease, 2, STATE_A, state_tokens=3)
    assert not await store.redis.exists(store.keys.session(sid, "turn"))
    lease, meta, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-2", input_digest=DIGEST)
    assert meta.version == 3
    await store.release_lease(lease)
    # Per session: meta, state and at most one record, however many turns.
    keys = {k.decode() async for k in store.redis.scan_iter(match="*")} - {"rwkv:tenant:t1:sessions"}
    assert keys == {store.keys.session(sid, p) for p in ("meta", "state")}


async def test_a_failed_commit_leaves_the_record_alone(store: StateStore) -> None:
    sid = await new_session(store)
    lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)
    await store.commit_and_release(lease, 0, STATE_A, state_tokens=1, record=record("t-1"))
    lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-2", input_digest=DIGEST)
    with pytest.raises(VersionConflict):
        await store.commit_and_release(lease, 0, STATE_B, state_tokens=2, record=record("t-2"))
    assert (await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)).state_version == 1


async def test_the_record_expires_after_its_ttl(store: StateStore) -> None:
    sid = await new_session(store)
    lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)
    await store.commit_and_release(lease, 0, STATE_A, state_tokens=1, record=record("t-1"), record_ttl_ms=150)
    assert 0 < await store.redis.pttl(store.keys.session(sid, "turn")) <= 150
    assert isinstance(await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST), TurnRecord)
    deadline = asyncio.get_running_loop().time() + 5
    while await store.redis.exists(store.keys.session(sid, "turn")):
        assert asyncio.get_running_loop().time() < deadline, "the record never expired"
        await asyncio.sleep(0.05)
    lease, meta, _ = await store.begin_or_replay(sid, 5_000, turn_id="t-1", input_digest=DIGEST)
    assert meta.version == 1  # past its TTL a retry is a new turn
    await store.release_lease(lease)


async def test_turn_ids_are_checked_before_they_are_stored(store: StateStore) -> None:
    sid = await new_session(store)
    for bad in ("has space", "x" * 129, "tab\t", "é"):
        with pytest.raises(InvalidArgument):
            await store.begin_or_replay(sid, 5_000, turn_id=bad, input_digest=DIGEST)
    with pytest.raises(InvalidArgument):  # a named turn needs its input's digest
        await store.begin_or_replay(sid, 5_000, turn_id="ok", input_digest="not hex")
    assert check_turn_id("") == "" and check_turn_id("0b7e1c2a-9f1d-4c57-8a53-1d2e3f405162")
    assert not await store.redis.exists(store.keys.session(sid, "lease"))  # nothing was taken
