"""Exactly-once turns: a turn retried with the same turn_id after its worker died between the commit and turn_end
gets the committed result back (text, usage, version, stop reason), never ABORTED and never applied twice.

First a real worker over gRPC on the test Redis (the replay as the worker sends it); then real processes, started
as tests/test_chaos.py starts them: workers that exit right after their commit (the test-only fault hook
RWKV_WORKER_FAULT_AFTER_COMMIT=exit: that moment cannot be hit with a timed SIGKILL), a healthy worker and a
front, driven through the SDK, every result compared with a single-process greedy twin."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.store import StateStore
from rwkv_serve.v1 import common_pb2
from rwkv_serve_client import RWKVClient, StopReason, TurnResult, UnavailableError
from service.router import rendezvous_score
from tests.test_chaos import Cluster, _wait
from tests.test_e2e import Twin
from tests.test_worker_server import Worker, chat, run, worker  # noqa: F401  (worker: a fixture)
from worker.tokenizer import WorldTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny"


# ---- one worker over gRPC ----------------------------------------------------------------------------------


async def test_the_worker_replays_a_committed_turn_instead_of_running_it_again(worker: Worker,  # noqa: F811
                                                                              store: StateStore) -> None:
    sid = (await store.create_session(tenant="t", model=MODEL, template="chat", ttl_ms=60_000)).session_id
    request = chat(sid, "Hello there", max_tokens=6, turn_id="turn-1")
    tokens, text, end, events = await run(worker.stub, request)
    assert end.state_version == 1 and not end.replayed and len(events) > 3
    # The same request again (its answer was lost): the committed result, whole, in three events.
    again, again_text, replayed, replay_events = await run(worker.stub, request)
    assert [e.WhichOneof("event") for e in replay_events] == ["turn_start", "delta", "turn_end"]
    assert all(e.turn_id == "turn-1" for e in replay_events)
    assert (again, again_text) == (tokens, text)
    assert replay_events[0].turn_start.prompt_tokens == events[0].turn_start.prompt_tokens
    assert replayed.replayed and replayed.state_version == 1
    replayed.replayed = False
    assert replayed == end  # stop reason, usage, version, stop string and token: as committed
    # Pinned to the version it started from (as the front pins a rerun after a lost worker): still the replay,
    # not VersionConflict.
    pinned = chat(sid, "Hello there", max_tokens=6, turn_id="turn-1", expected_state_version=0)
    assert (await run(worker.stub, pinned))[2].replayed
    meta = await store.get_session(sid)
    assert (meta.version, meta.turns) == (1, 1)  # applied once
    # Another turn id, or the same id with another input, is a new turn.
    assert (await run(worker.stub, chat(sid, "Hello there", max_tokens=6, turn_id="turn-2")))[2].state_version == 2
    reused = await run(worker.stub, chat(sid, "Something else", max_tokens=6, turn_id="turn-2"))
    assert reused[2].state_version == 3 and not reused[2].replayed
    # A retry of an older turn is no replay (only the latest is kept): a turn without an id drops the record.
    assert (await run(worker.stub, chat(sid, "Third", max_tokens=2)))[2].state_version == 4
    assert not await store.redis.exists(store.keys.session(sid, "turn"))


async def test_a_replay_without_token_ids_asked_and_turns_that_never_commit(worker: Worker,  # noqa: F811
                                                                           store: StateStore) -> None:
    sid = (await store.create_session(tenant="t", model=MODEL, template="chat", ttl_ms=60_000)).session_id
    request = chat(sid, "Hi", max_tokens=4, turn_id="a")
    _, text, end, _ = await run(worker.stub, request)
    request.return_token_ids = False
    tokens, again_text, replayed, events = await run(worker.stub, request)
    assert (tokens, again_text, replayed.state_version, replayed.replayed) == ([], text, 1, True)
    # Ephemeral and stateless turns store nothing: the same turn id runs again each time.
    ephemeral = chat(sid, "Hi", max_tokens=4, turn_id="e", commit=False)
    assert [(await run(worker.stub, ephemeral))[2].replayed for _ in range(2)] == [False, False]
    assert (await store.get_session(sid)).version == 1


# ---- real processes: the worker dies between its commit and turn_end ----------------------------------------


class FaultCluster(Cluster):
    """test_chaos's cluster, whose workers may be started with extra settings (the fault hook)."""

    def start_worker(self, **env: str) -> str:  # type: ignore[override]
        from tests.test_chaos import WORKER_ENV

        worker_id = f"{'f' if env else 'w'}{self._count}"
        self._count += 1
        self.workers[worker_id] = self._spawn(
            worker_id, ["-m", "worker.server", "--host", "127.0.0.1", "--port", "0", "--worker-id", worker_id],
            {**WORKER_ENV, "RWKV_WORKER_REDIS_URL": self.url, "RWKV_WORKER_MODEL_PATH": str(self.checkpoint),
             **env})
        return worker_id


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[FaultCluster]:
    cluster = FaultCluster(tmp_path_factory.mktemp("exactly-once"), tiny_checkpoint)
    try:
        cluster.start_redis()
        # Three workers that exit right after a commit (one per test), one healthy one; they load in parallel.
        workers = [cluster.start_worker(RWKV_WORKER_FAULT_AFTER_COMMIT="exit") for _ in range(3)]
        workers.append(cluster.start_worker())
        cluster.wait_workers(*workers)
        cluster.start_front()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def twin_parts(tiny_model) -> tuple[object, WorldTokenizer]:
    return tiny_model, WorldTokenizer()


def _healthy(cluster: FaultCluster) -> str:
    (healthy,) = [w for w in cluster.workers if w.startswith("w")]
    return healthy


def _homed(cluster: FaultCluster, rwkv: RWKVClient, first: str, second: str) -> str:
    """A new session (greedy, 12 tokens) whose rendezvous order over the live workers starts first, second: its
    turn runs on `first`, and once that one is gone, on `second`."""
    live = [w for w in cluster.live_workers() if cluster.db.exists(f"rwkv:worker:{w}")]
    for _ in range(2000):
        sid = rwkv.create_session(MODEL, temperature=0, max_tokens=12).session_id
        order = sorted(live, key=lambda w: rendezvous_score(sid, w), reverse=True)
        if order[:2] == [first, second]:
            return sid
        rwkv.delete_session(sid)
    raise AssertionError(f"no session homed on {first} then {second}")


def _faulty(cluster: FaultCluster) -> str:
    """A live worker with the fault hook (the previous test's has exited and left the registry)."""
    for worker_id, proc in cluster.workers.items():
        if proc.poll() is not None:
            _wait(lambda w=worker_id: not cluster.db.exists(f"rwkv:worker:{w}"), "a dead worker leaves the registry")
    return next(w for w in cluster.live_workers() if w.startswith("f"))


def _session_on(cluster: FaultCluster, rwkv: RWKVClient, worker_id: str, max_tokens: int = 12) -> str:
    """A new greedy session whose turns go to `worker_id` (first in its rendezvous order over the live workers)."""
    others = [w for w in cluster.live_workers() if w != worker_id and cluster.db.exists(f"rwkv:worker:{w}")]
    for _ in range(2000):
        sid = rwkv.create_session(MODEL, temperature=0, max_tokens=max_tokens).session_id
        if all(rendezvous_score(sid, worker_id) > rendezvous_score(sid, w) for w in others):
            return sid
        rwkv.delete_session(sid)
    raise AssertionError(f"no session homed on {worker_id}")


def _control(cluster: FaultCluster, rwkv: RWKVClient, text: str) -> TurnResult:
    """The same first turn on a session of its own, run once on the healthy worker: what the replay must equal."""
    result = rwkv.say(_session_on(cluster, rwkv, _healthy(cluster)), text, return_token_ids=True)
    assert result.worker_id == _healthy(cluster) and result.state_version == 1
    return result


def _same_result(result: TurnResult, control: TurnResult) -> None:
    assert (result.text, result.token_ids, result.stop_reason, result.usage, result.state_version,
            result.stop_string, result.stop_token_id) == (control.text, control.token_ids, control.stop_reason,
                                                          control.usage, control.state_version, control.stop_string,
                                                          control.stop_token_id)


def _applied_once(cluster: FaultCluster, sid: str) -> None:
    meta, state = cluster.stored(sid)
    assert (meta[b"version"], meta[b"turns"]) == (b"1", b"1") and state is not None


def test_without_sdk_retries_the_client_sees_unavailable_and_its_retry_gets_the_commit(
        cluster: FaultCluster, twin_parts) -> None:
    text = "My name is Ada."
    faulty, healthy = _faulty(cluster), _healthy(cluster)
    with RWKVClient(cluster.target, max_turn_retries=0) as rwkv:
        control = _control(cluster, rwkv, text)
        sid = _homed(cluster, rwkv, faulty, healthy)
        twin = Twin(*twin_parts)
        assert (control.text, control.token_ids) == twin.turn(text, 12)
        with pytest.raises(UnavailableError) as lost:  # text had streamed: the front does not rerun it
            rwkv.say(sid, text, return_token_ids=True, turn_id="ada-1")
        assert "lost worker" in lost.value.message and lost.value.retry_after_s == 0
        assert cluster.workers[faulty].wait(10) == 1  # it died after committing, before its turn_end
        _applied_once(cluster, sid)
        retried = rwkv.say(sid, text, return_token_ids=True, turn_id="ada-1")  # the same turn, by hand
        assert retried.worker_id == healthy
        _same_result(retried, control)
        _applied_once(cluster, sid)
        # The session goes on exactly (greedy) from the state the dead worker committed.
        second = rwkv.say(sid, "What is my name?", return_token_ids=True)
        assert second.state_version == 2 and (second.text, second.token_ids) == twin.turn("What is my name?", 12)


def test_say_retries_by_itself_and_gets_the_committed_result(cluster: FaultCluster, twin_parts) -> None:
    text = "Count to three."
    faulty, healthy = _faulty(cluster), _healthy(cluster)
    with RWKVClient(cluster.target) as rwkv:  # retries on by default
        control = _control(cluster, rwkv, text)
        sid = _homed(cluster, rwkv, faulty, healthy)
        began = time.monotonic()
        result = rwkv.say(sid, text, return_token_ids=True)
        assert time.monotonic() - began < 30
        assert cluster.workers[faulty].wait(10) == 1
        assert result.worker_id == healthy  # answered by the live worker, from the dead one's commit
        _same_result(result, control)
        _applied_once(cluster, sid)
        twin = Twin(*twin_parts)
        twin.turn(text, 12)
        assert rwkv.say(sid, "And then?", return_token_ids=True).token_ids == twin.turn("And then?", 12)[1]


def test_a_streaming_chat_yields_the_text_once_across_the_retry(cluster: FaultCluster, twin_parts) -> None:
    text = "Tell me about the sea."
    faulty, healthy = _faulty(cluster), _healthy(cluster)
    with RWKVClient(cluster.target) as rwkv:
        control = _control(cluster, rwkv, text)
        sid = _homed(cluster, rwkv, faulty, healthy)
        items = list(rwkv.chat(sid, text, return_token_ids=True))
        assert cluster.workers[faulty].wait(10) == 1
        *deltas, result = items
        assert isinstance(result, TurnResult) and all(isinstance(d, str) for d in deltas)
        # The dead worker streamed its reply, then committed; the retry got the commit: no text twice.
        assert "".join(deltas) == result.text == control.text
        _same_result(result, control)
        assert result.worker_id == healthy and result.stop_reason is not StopReason.CANCELLED
        _applied_once(cluster, sid)
        twin = Twin(*twin_parts)
        twin.turn(text, 12)
        assert rwkv.say(sid, "More.", return_token_ids=True).token_ids == twin.turn("More.", 12)[1]


def test_the_replay_is_flagged_on_the_wire(cluster: FaultCluster) -> None:
    """A raw gRPC client sees TurnEnd.replayed on the retry of a committed turn (the healthy worker commits)."""
    import grpc

    from rwkv_serve.v1 import api_pb2, api_pb2_grpc

    with RWKVClient(cluster.target) as rwkv:
        sid = _session_on(cluster, rwkv, _healthy(cluster), max_tokens=3)
    turn = api_pb2.ChatRequest(turn=api_pb2.ChatTurn(session_id=sid, text="hi", turn_id="raw-1"))
    with grpc.insecure_channel(cluster.target) as channel:
        stub = api_pb2_grpc.RwkvServiceStub(channel)
        first = list(stub.Chat(iter([turn]), timeout=60))
        again = list(stub.Chat(iter([turn]), timeout=60))
    end: common_pb2.TurnEnd = first[-1].turn_end
    assert not end.replayed and end.state_version == 1
    assert again[-1].turn_end.replayed and again[-1].turn_end.state_version == 1
    assert "".join(e.delta.text for e in again if e.HasField("delta")) == \
        "".join(e.delta.text for e in first if e.HasField("delta"))
