"""End to end on a real 6-node Redis Cluster: a front and two workers (real processes) given one node's URL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rwkv_serve_client import RWKVClient
from service.stack import Stack, free_port
from tests.redis_topologies import RedisCluster, start_cluster
from tests.test_e2e import MODEL, Twin, checkpoint, twin_model  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster-e2e"))
    try:
        yield cluster
    finally:
        cluster.stop()


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
