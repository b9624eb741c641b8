"""End to end on a real 6-node Redis Cluster: a front and two workers (real processes) given one node's URL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rwkv_serve_client import RWKVClient
from service.stack import Stack, free_port
from tests.redis_topologies import RedisCluster, running_cluster
from tests.test_e2e import MODEL, Twin, checkpoint, twin_model  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster-e2e")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def stack(cluster: RedisCluster, checkpoint: Path) -> Iterator[Stack]:  # noqa: F811
    stack = Stack(port=free_port(), model=checkpoint, model_id=MODEL, redis_url=cluster.url, workers=2, quiet=False,
                  extra_env={"RWKV_WORKER_TORCH_THREADS": "1", "RWKV_FRONT_DISCOVERY_INTERVAL_S": "0.2",
                             "RWKV_WORKER_REDIS_WAIT_REPLICAS": "1", "RWKV_FRONT_REDIS_WAIT_REPLICAS": "1"})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_conversations_on_a_cluster_equal_the_single_process_run(stack: Stack, cluster: RedisCluster,
                                                                  twin_model) -> None:  # noqa: F811
    model, tokenizer = twin_model
    with RWKVClient(stack.target) as rwkv:
        sessions = [rwkv.create_session(MODEL, temperature=0, max_tokens=8) for _ in range(6)]
        twins = [Twin(model, tokenizer) for _ in sessions]
        for turn in range(3):
            for session, twin in zip(sessions, twins):
                result = rwkv.say(session.session_id, f"Question {turn} of {session.session_id[:4]}?",
                                  return_token_ids=True)
                assert (result.text, result.token_ids) == twin.turn(f"Question {turn} of {session.session_id[:4]}?", 8)
                assert result.state_version == turn + 1
        listed = {s.session_id for s in rwkv.list_sessions().sessions}
        assert {s.session_id for s in sessions} <= listed  # the tenant index, on whichever master holds it
        assert [m.id for m in rwkv.list_models()] == [MODEL]  # the registry: both workers found
    owners = {cluster.owner(f"rwkv:{{{s.session_id}}}:meta").port for s in sessions}
    assert len(owners) >= 2  # the sessions really are spread over the masters


def test_admin_cli_on_a_cluster(cluster: RedisCluster) -> None:
    created = subprocess.run([sys.executable, "-m", "service.admin", "--redis-url", cluster.url, "keys", "create",
                              "--tenant", "acme"], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    listed = subprocess.run([sys.executable, "-m", "service.admin", "--redis-url", cluster.url, "keys", "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "acme" in listed.stdout, listed.stderr


def test_a_master_killed_mid_conversation_loses_no_acknowledged_turn(stack: Stack, cluster: RedisCluster,
                                                                     twin_model) -> None:  # noqa: F811
    """Last in the module: SIGKILLs a master. Sessions keep chatting while its replica takes over (WAIT 1: a turn
    whose turn_end a client saw is on a replica); the SDK retries failed turns with the same turn_id. Every turn is
    there exactly once and the conversations go on exactly as the single-process greedy run."""
    model, tokenizer = twin_model
    turns = 6
    with RWKVClient(stack.target, max_turn_retries=12, retry_backoff_s=0.3) as rwkv:
        sessions = [rwkv.create_session(MODEL, temperature=0, max_tokens=6) for _ in range(4)]
        twins = [Twin(model, tokenizer) for _ in sessions]
        victim = cluster.owner(f"rwkv:{{{sessions[0].session_id}}}:meta")
        results: dict[int, list] = {i: [] for i in range(len(sessions))}
        errors: list[BaseException] = []
        killed = threading.Event()

        def converse(i: int) -> None:
            try:
                for turn in range(turns):
                    if i == 0 and turn == 2:
                        victim.kill()  # mid-conversation, between two of this session's turns
                        killed.set()
                    results[i].append(rwkv.say(sessions[i].session_id, f"Turn {turn}?", return_token_ids=True))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=converse, args=(i,)) for i in range(len(sessions))]
        for thread in threads:
            thread.start()
        assert killed.wait(120)
        time.sleep(4)  # the replica is promoted; then the old master comes back as its replica (as a pod would)
        victim.restart()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        for i, twin in enumerate(twins):
            expected = [twin.turn(f"Turn {turn}?", 6) for turn in range(turns)]
            assert [(r.text, r.token_ids) for r in results[i]] == expected
            assert [r.state_version for r in results[i]] == list(range(1, turns + 1))  # each applied once
            assert rwkv.get_session(sessions[i].session_id).state_version == turns
