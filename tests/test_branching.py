"""Branching: a session keeps its last keep_versions earlier states as turns commit; ForkSession(state_version=v)
continues from any of them exactly as the session did from there; an evicted version is NOT_FOUND saying so;
deleting the session deletes them. Through a real front and worker with the SDK (real Redis, the tiny model)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from rwkv_serve_client import InvalidArgumentError, RWKVClient, SessionNotFoundError
from tests.e2e_fixtures import InprocService, inproc_service

MODEL_ID = "tiny"
GREEDY = {"temperature": 0.0, "stop_token_ids": [], "max_tokens": 4}
BRANCH_DB = 8  # a database of its own: other tests flush db 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def service(redis_url: str, tiny_model, tokenizer) -> Iterator[InprocService]:
    with inproc_service(redis_url, BRANCH_DB, tiny_model, tokenizer, front={"max_keep_versions": 3}) as service:
        yield service


def test_forks_from_kept_versions_continue_as_the_session_did(service: InprocService) -> None:
    inputs = ["one", "two", "three", "four"]
    with RWKVClient(service.target) as client:
        session = client.create_session(MODEL_ID, system_prompt="Be brief.", keep_versions=2)
        assert session.keep_versions == 2 and client.get_session(session.session_id).keep_versions == 2
        replies = [client.say(session.session_id, text, **GREEDY) for text in inputs]
        assert [r.state_version for r in replies] == [1, 2, 3, 4]
        # Versions 2 and 3 are kept besides the current 4: a fork from v continues with turn v+1's reply.
        for version in (2, 3, 4):
            fork = client.fork_session(session.session_id, state_version=version)
            assert fork.state_version == version and fork.state_tokens == replies[version - 1].usage.state_tokens
            again = client.say(fork.session_id, inputs[version] if version < 4 else "five", **GREEDY)
            if version < 4:
                assert again.text == replies[version].text and again.state_version == version + 1
        with pytest.raises(SessionNotFoundError, match=r"was evicted.*keeps its last 2 earlier versions"):
            client.fork_session(session.session_id, state_version=1)
        with pytest.raises(SessionNotFoundError, match="has no state version 9"):
            client.fork_session(session.session_id, state_version=9)
        # Branching does not disturb the source: its next turn continues from version 4.
        assert client.say(session.session_id, "five", **GREEDY).state_version == 5
        with pytest.raises(SessionNotFoundError, match="was evicted"):
            client.fork_session(session.session_id, state_version=2)  # it fell out with the commit of version 5


def test_keep_versions_is_bounded_and_a_session_without_it_keeps_nothing(service: InprocService) -> None:
    with RWKVClient(service.target) as client:
        with pytest.raises(InvalidArgumentError, match="keep_versions must be 0-3"):
            client.create_session(MODEL_ID, keep_versions=4)
        plain = client.create_session(MODEL_ID)
        client.say(plain.session_id, "hi", **GREEDY)
        client.say(plain.session_id, "again", **GREEDY)
        with pytest.raises(SessionNotFoundError, match="keeps its last 0"):
            client.fork_session(plain.session_id, state_version=1)
        assert client.fork_session(plain.session_id, state_version=2).state_version == 2  # the current one


def test_deleting_a_session_deletes_its_kept_versions(service: InprocService) -> None:
    r = redis.Redis.from_url(service.redis_url)
    with RWKVClient(service.target) as client:
        session = client.create_session(MODEL_ID, keep_versions=3)
        for text in ["a", "b", "c"]:
            client.say(session.session_id, text, **GREEDY)
        family = session.session_id.split(".")[0]
        kept = sorted(k.decode() for k in r.scan_iter(match=f"rwkv:{{{family}}}:state:v*"))
        assert kept == [f"rwkv:{{{family}}}:state:v{v}" for v in (1, 2)]  # v0 has no bytes; v3 is the state
        client.delete_session(session.session_id)
        assert list(r.scan_iter(match=f"rwkv:{{{family}}}:*")) == []
