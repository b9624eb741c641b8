"""The store on a real 6-node Redis Cluster (3 masters, 3 replicas) and behind real Sentinels, on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import SessionBusy, SessionNotFound, StoreUnavailable, VersionConflict
from common.store import StateStore, StoreConfigError
from common.worker_api import ModelDescription, WorkerLoad
from service.stack import free_port
from tests.redis_topologies import RedisCluster, SentinelSetup, running_cluster, start_redis, start_sentinel_setup

STATE = b"\x01state" * 4000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
async def cstore(cluster: RedisCluster) -> StateStore:
    for node in cluster.masters():
        node.client().flushall()
    store = StateStore.from_url(cluster.url)
    await store.verify()
    yield store
    await store.close()


async def test_a_node_url_is_detected_as_a_cluster(cstore: StateStore) -> None:
    assert cstore.mode == "cluster"


async def test_sessions_turns_and_forks_on_a_cluster(cstore: StateStore, cluster: RedisCluster) -> None:
    metas = [await cstore.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)
             for _ in range(12)]
    # The sessions spread over every master (their hash tags are random), the index is one key.
    owners = {cluster.owner(cstore.keys.session(m.session_id, "meta")).port for m in metas}
    assert len(owners) == 3
    for meta in metas:
        lease, got, data = await cstore.begin_turn(meta.session_id, 5_000, "w1")
        assert got == meta and data is None
        with pytest.raises(SessionBusy):
            await cstore.begin_turn(meta.session_id, 5_000, "w2")
        assert await cstore.commit_and_release(lease, 0, STATE, state_tokens=3) == 1
    lease, meta, data = await cstore.begin_turn(metas[0].session_id, 5_000)
    assert (meta.version, data) == (1, STATE)
    with pytest.raises(VersionConflict):
        await cstore.commit_and_release(lease, 0, STATE, state_tokens=3)
    fork = await cstore.fork_session(metas[0].session_id)
    assert (await cstore.load_state(fork.session_id))[1] == STATE
    page, token = await cstore.list_sessions("t1", page_size=100)
    assert token == "" and {m.session_id for m in page} == {m.session_id for m in metas} | {fork.session_id}
    assert await cstore.count_sessions("t1", exact=True) == 13
    await cstore.delete_session(metas[1].session_id)
    assert await cstore.count_sessions("t1", exact=True) == 12


async def test_scans_cover_every_master(cstore: StateStore, cluster: RedisCluster) -> None:
    names = [f"p{i}" for i in range(20)]
    for name in names:
        await cstore.put_preset("tiny", name, STATE, description=name)
    assert len({cluster.owner(cstore.keys.preset("tiny", n)).port for n in names}) == 3  # spread over the masters
    assert await cstore.list_presets("tiny") == sorted(names)
    assert [p.description for p in await cstore.describe_presets("tiny")] == sorted(names)
    hashes = [f"{i:064x}" for i in range(10)]
    for h in hashes:
        await cstore.put_api_key(h, f"tenant{h[-1]}")
    assert await cstore.list_api_keys() == sorted((h, f"tenant{h[-1]}") for h in hashes)
    assert await cstore.delete_preset("tiny", "p3") and "p3" not in await cstore.list_presets("tiny")


async def test_registry_prefix_cache_and_quotas_on_a_cluster(cstore: StateStore) -> None:
    loads = [WorkerLoad(f"w{i}", f"127.0.0.1:{i}", ModelDescription("tiny", fingerprint="ab")) for i in range(5)]
    for load in loads:
        await cstore.register_worker(load, 5_000)
    assert await cstore.list_workers("tiny") == loads
    # The prefix cache: a model's entries and index share one slot, so find (one script over every candidate) and
    # put (with its LRU eviction) run on the master that owns it.
    digests = [f"{i:02x}" * 32 for i in range(4)]
    for digest in digests[:3]:
        await cstore.put_prefix("tiny", digest, STATE, ttl_ms=5_000, max_bytes=2 * len(STATE))
    assert await cstore.prefix_usage("tiny") == (2, 2 * len(STATE))  # the oldest one was evicted
    assert await cstore.find_prefix("tiny", digests, 5_000) == 3
    assert await cstore.find_prefix("tiny", digests[:1], 5_000) == 0
    assert await cstore.get_prefix("tiny", digests[2]) == STATE
    assert await cstore.add_tokens("t1", 7, 10, 5_000) == 10 and await cstore.get_tokens("t1", 7) == 10


async def test_startup_names_the_fix_when_cluster_mode_is_forced_wrong(cluster: RedisCluster, tmp_path: Path) -> None:
    store = StateStore.from_url(cluster.url, cluster=False)
    with pytest.raises(StoreConfigError, match="is a Redis Cluster node but cluster mode is forced off"):
        await store.verify()
    await store.close()
    single = start_redis(tmp_path / "single", free_port())  # not beside the cluster: a port nobody holds
    try:
        store = StateStore.from_url(f"redis://127.0.0.1:{single.port}/0", cluster=True)
        with pytest.raises(StoreConfigError, match="not a Redis Cluster node but cluster mode is forced on"):
            await store.verify()
        await store.close()
        replica = start_redis(tmp_path / "replica", free_port(), "--replicaof", "127.0.0.1", str(single.port))
        try:
            store = StateStore.from_url(f"redis://127.0.0.1:{replica.port}/0")
            with pytest.raises(StoreConfigError, match="read-only replica"):
                await store.verify()
            await store.close()
        finally:
            replica.kill()
    finally:
        single.kill()


async def test_a_moved_slot_is_followed(cstore: StateStore, cluster: RedisCluster) -> None:
    """Resharding: the session's slot moves to another master between two turns; the turn protocol follows."""
    meta = await cstore.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)
    lease, _, _ = await cstore.begin_turn(meta.session_id, 5_000)
    assert await cstore.commit_and_release(lease, 0, STATE, state_tokens=3) == 1
    key = cstore.keys.session(meta.session_id, "meta")
    source = cluster.owner(key)
    slot, owner_id = cluster.begin_migration(key)
    cluster.finish_migration(slot, owner_id)
    await asyncio.sleep(0.5)
    assert cluster.owner(key).port != source.port
    lease, got, data = await cstore.begin_turn(meta.session_id, 5_000)  # MOVED -> the new owner
    assert (got.version, data) == (1, STATE)
    assert await cstore.commit_and_release(lease, 1, STATE[::-1], state_tokens=6) == 2


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = start_sentinel_setup(tmp_path_factory.mktemp("sentinel"))
    try:
        yield setup
    finally:
        setup.stop()


async def test_sentinel_url_follows_a_failover(sentinels: SentinelSetup) -> None:
    store = StateStore.from_url(sentinels.url)
    try:
        await store.verify()
        assert store.mode == "sentinel"
        meta = await store.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)
        lease, _, _ = await store.begin_turn(meta.session_id, 5_000)
        assert await store.commit_and_release(lease, 0, STATE, state_tokens=3) == 1
        replica = sentinels.replica.client()
        for _ in range(100):  # replicated asynchronously
            if replica.hget(store.keys.session(meta.session_id, "meta"), "version") == b"1":
                break
            await asyncio.sleep(0.05)
        old_master = sentinels.current_master_port()
        sentinels.master.kill()
        for _ in range(200):  # the sentinels notice (1 s), agree and promote the replica
            if sentinels.current_master_port() != old_master:
                break
            await asyncio.sleep(0.1)
        assert sentinels.current_master_port() == sentinels.replica.port
        for _ in range(50):  # the same store, no restart: the next calls reach the new master
            try:
                got = await store.get_session(meta.session_id)
                break
            except Exception:  # StoreUnavailable while the old connection dies
                await asyncio.sleep(0.2)
        assert got.version == 1
        lease, _, data = await store.begin_turn(meta.session_id, 5_000)
        assert data == STATE
        assert await store.commit_and_release(lease, 1, STATE[::-1], state_tokens=6) == 2
    finally:
        await store.close()


async def test_a_turn_during_a_slot_migration_waits_for_it(cstore: StateStore, cluster: RedisCluster) -> None:
    """Resharding caught in the middle: the session's keys already moved, the slot not yet handed over (the old
    owner answers ASK). The turn protocol waits the migration out instead of failing."""
    meta = await cstore.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)
    lease, _, _ = await cstore.begin_turn(meta.session_id, 5_000)
    assert await cstore.commit_and_release(lease, 0, STATE, state_tokens=3) == 1
    key = cstore.keys.session(meta.session_id, "meta")
    source = cluster.owner(key)
    slot, owner_id = cluster.begin_migration(key)

    async def hand_over() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.finish_migration, slot, owner_id)

    handover = asyncio.create_task(hand_over())
    lease, got, data = await cstore.begin_turn(meta.session_id, 5_000)  # ASK while migrating, then MOVED
    await handover
    assert (got.version, data) == (1, STATE)
    assert await cstore.commit_and_release(lease, 1, STATE[::-1], state_tokens=6) == 2
    assert cluster.owner(key).port != source.port


async def test_kept_versions_and_forks_from_them_on_a_cluster(cstore: StateStore) -> None:
    """Branching's commit (the replaced state renamed to a kept version, the oldest dropped) and a fork from a kept
    version stay inside the session's slot, so they work wherever the cluster put it."""
    meta = await cstore.create_session(tenant="t", model="tiny", template="chat", ttl_ms=60_000, keep_versions=2)
    sid = meta.session_id
    for version in range(4):
        lease, _, _ = await cstore.begin_turn(sid, 5_000)
        committed = await cstore.commit_and_release(lease, version, STATE + bytes([version]),
                                                    state_tokens=10 * (version + 1), keep_versions=2)
        assert committed == version + 1
    fork = await cstore.fork_session(sid, state_version=2)
    assert (fork.version, fork.state_tokens, fork.turns) == (2, 20, 2)
    assert (await cstore.load_state(fork.session_id))[1] == STATE + bytes([1])  # what version 2 committed
    with pytest.raises(SessionNotFound, match="was evicted"):
        await cstore.fork_session(sid, state_version=1)
    owned = cstore.keys.session_all(sid, 4, 2)
    assert await cstore.redis.exists(*owned) >= 5  # meta, state, kept hash, v3, v4 (one slot: one EXISTS)
    await cstore.delete_session(sid)
    assert await cstore.redis.exists(*owned) == 0


async def test_a_cluster_that_is_down_stops_the_start_and_fails_calls_as_unavailable(cluster: RedisCluster) -> None:
    """Last of the cluster tests: takes a master and its replica down, so a third of the slots has no owner."""
    store = StateStore.from_url(cluster.url)
    await store.verify()
    meta = await store.create_session(tenant="t1", model="tiny", template="chat", ttl_ms=60_000)
    victim = cluster.owner(store.keys.session(meta.session_id, "meta"))
    victim_id = victim.client().cluster("myid")
    for node in cluster.nodes:  # its replica first, then the master: no failover can save the slots
        if node.proc.poll() is None and node.client().info("replication").get("master_port") == victim.port:
            node.kill()
    victim.kill()
    survivor = next(n for n in cluster.nodes if n.proc.poll() is None)
    for _ in range(100):
        if survivor.client().cluster("info").get("cluster_state") == "fail":
            break
        await asyncio.sleep(0.1)
    assert survivor.client().cluster("info").get("cluster_state") == "fail", victim_id
    with pytest.raises(StoreUnavailable):
        await store.get_session(meta.session_id)
    await store.close()
    fresh = StateStore.from_url(f"redis://127.0.0.1:{survivor.port}/0")
    with pytest.raises(StoreConfigError, match="Redis Cluster .* (is down|is not usable)"):
        await fresh.verify()
    await fresh.close()
