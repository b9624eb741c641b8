"""Durable commits (REDIS_WAIT_REPLICAS): on a real master + replica pair (two redis-server processes, the second
started with --replicaof), a commit waits until the replica holds it; with the replica stopped (SIGSTOP) the commit
fails with UNAVAILABLE naming the version the master holds, and the retry of that turn (same turn id) is answered
from the commit once the replica acknowledges it, through the store, and through a real front, worker and SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.errors import StoreUnavailable
from common.store import StateStore
from common.store.turns import TurnRecord
from rwkv_serve_client import RWKVClient, UnavailableError
from service.stack import redis_server_binary
from tests.conftest import free_port
from tests.e2e_fixtures import InprocService
from tests.test_e2e import Twin

DIGEST = "cd" * 16
STATE_A, STATE_B = b"a" * 4096, b"b" * 4096


def _until(check, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)


class Pair:
    """A master and its replica on loopback ports, no persistence."""

    def __init__(self, workdir: Path) -> None:
        self.master_port, self.replica_port = free_port(), free_port()
        binary = redis_server_binary()
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.procs = [
            subprocess.Popen([binary, "--port", str(self.master_port), "--dir", str(workdir), *common],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([binary, "--port", str(self.replica_port), "--dir", str(workdir / "replica"), *common,
                              "--replicaof", "127.0.0.1", str(self.master_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        self.master = redis.Redis(port=self.master_port, socket_timeout=5)
        self.replica = redis.Redis(port=self.replica_port, socket_timeout=5)
        _until(lambda: self.replica.info("replication")["master_link_status"] == "up", "the replica's link")
        _until(lambda: self.master.info("replication")["connected_slaves"] == 1, "the master's replica")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.master_port}/0"

    def stop_replica(self) -> None:
        os.kill(self.procs[1].pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        os.kill(self.procs[1].pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume_replica()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.master.close()
        self.replica.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    workdir = tmp_path_factory.mktemp("durable")
    (workdir / "replica").mkdir()
    pair = Pair(workdir)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def replica_resumed(pair: Pair) -> Iterator[Pair]:
    pair.master.flushdb()  # (replicated)
    try:
        yield pair
    finally:
        pair.resume_replica()


def _record(turn_id: str) -> TurnRecord:
    return TurnRecord(turn_id, DIGEST, "reply", (1, 2), 3, 2, 5, 3)


async def test_a_commit_waits_for_the_replica_and_fails_unavailable_without_it(replica_resumed: Pair) -> None:
    pair = replica_resumed
    store = StateStore.from_url(pair.url)
    store.wait_replicas, store.wait_timeout_ms = 1, 300
    try:
        sid = (await store.create_session(tenant="t", model="tiny", template="chat", ttl_ms=60_000)).session_id
        lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t1", input_digest=DIGEST)
        assert await store.commit_and_release(lease, 0, STATE_A, state_tokens=1, record=_record("t1")) == 1
        assert pair.replica.get(store.keys.session(sid, "state")) == STATE_A  # on the replica once it returned

        pair.stop_replica()
        lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t2", input_digest=DIGEST)  # no WAIT here
        with pytest.raises(StoreUnavailable) as unconfirmed:
            await store.commit_and_release(lease, 1, STATE_B, state_tokens=2, record=_record("t2"))
        message = unconfirmed.value.message
        assert "version 2" in message and "0 of the 1 required replicas" in message and "300 ms" in message
        assert "same turn_id" in message and unconfirmed.value.retry_after_s == 1.0
        # Committed on the master all the same (state, version and the turn's record), lease released.
        assert pair.master.get(store.keys.session(sid, "state")) == STATE_B
        assert pair.master.hget(store.keys.session(sid, "meta"), "version") == b"2"
        assert not pair.master.exists(store.keys.session(sid, "lease"))
        with pytest.raises(StoreUnavailable):  # the retry's replay waits for the replica too
            await store.begin_or_replay(sid, 5_000, turn_id="t2", input_digest=DIGEST)

        pair.resume_replica()
        replay = await store.begin_or_replay(sid, 5_000, turn_id="t2", input_digest=DIGEST)
        assert isinstance(replay, TurnRecord) and replay.state_version == 2 and replay.text == "reply"
        assert pair.replica.get(store.keys.session(sid, "state")) == STATE_B
        lease, meta, _ = await store.begin_or_replay(sid, 5_000, turn_id="t3", input_digest=DIGEST)
        assert await store.commit_and_release(lease, meta.version, STATE_A, state_tokens=3) == 3
    finally:
        await store.close()


async def test_without_wait_replicas_a_stopped_replica_changes_nothing(replica_resumed: Pair) -> None:
    pair = replica_resumed
    store = StateStore.from_url(pair.url)
    try:
        sid = (await store.create_session(tenant="t", model="tiny", template="chat", ttl_ms=60_000)).session_id
        pair.stop_replica()
        lease, _, _ = await store.begin_or_replay(sid, 5_000, turn_id="t1", input_digest=DIGEST)
        assert await store.commit_and_release(lease, 0, STATE_A, state_tokens=1, record=_record("t1")) == 1
        assert isinstance(await store.begin_or_replay(sid, 5_000, turn_id="t1", input_digest=DIGEST), TurnRecord)
    finally:
        await store.close()


@pytest.fixture
def service(replica_resumed: Pair, tiny_model, tokenizer) -> Iterator[InprocService]:
    running = InprocService(replica_resumed.url, tiny_model, tokenizer,
                            worker={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 300})
    try:
        yield running
    finally:
        running.close()


def test_a_turn_whose_commit_is_not_replicated_fails_and_its_retry_gets_the_commit(
        service: InprocService, replica_resumed: Pair, tiny_model, tokenizer) -> None:
    pair = replica_resumed
    twin = Twin(tiny_model, tokenizer)
    with RWKVClient(service.target, max_turn_retries=0) as rwkv:
        sid = rwkv.create_session("tiny", temperature=0, max_tokens=8).session_id
        first = rwkv.say(sid, "Hello.", return_token_ids=True)
        assert first.state_version == 1 and first.token_ids == twin.turn("Hello.", 8)[1]
        pair.stop_replica()
        with pytest.raises(UnavailableError) as unconfirmed:
            rwkv.say(sid, "Still there?", turn_id="durable-2")
        assert "committed at version 2" in unconfirmed.value.message and unconfirmed.value.retry_after_s == 1.0
        pair.resume_replica()
        retried = rwkv.say(sid, "Still there?", turn_id="durable-2", return_token_ids=True)
        assert retried.state_version == 2 and retried.token_ids == twin.turn("Still there?", 8)[1]
        assert pair.replica.hget(f"rwkv:{{{sid}}}:meta", "turns") == b"2"  # applied once, and replicated


def test_say_rides_out_a_replica_that_comes_back(service: InprocService, replica_resumed: Pair, tiny_model,
                                                 tokenizer) -> None:
    """The SDK's own retry (after the server's 1 s hint) gets the replay once the replica is back: here it comes
    back as soon as the master holds the unconfirmed commit."""
    pair = replica_resumed
    twin = Twin(tiny_model, tokenizer)
    with RWKVClient(service.target) as rwkv:
        sid = rwkv.create_session("tiny", temperature=0, max_tokens=8).session_id
        meta = f"rwkv:{{{sid}}}:meta"
        pair.stop_replica()

        def resume_once_committed() -> None:
            _until(lambda: pair.master.hget(meta, "version") == b"1", "the unconfirmed commit", 60)
            pair.resume_replica()

        resumer = threading.Thread(target=resume_once_committed)
        resumer.start()
        try:
            result = rwkv.say(sid, "Hello.", return_token_ids=True)
        finally:
            resumer.join(60)
        assert result.state_version == 1 and result.token_ids == twin.turn("Hello.", 8)[1]
        assert pair.master.hget(meta, "turns") == b"1" and pair.replica.hget(meta, "version") == b"1"
