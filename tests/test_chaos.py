"""Chaos on real processes: workers and a front as child processes, on a redis-server of this module's own (with an
append-only file, so it can be restarted without losing what it holds). A worker killed mid-reply (after and before
its first delta), a worker and a front stopped with SIGTERM under load, a front replaced, Redis restarted. Each time:
what the client sees, that every committed state is intact, and that the session goes on exactly as its
single-process twin says it should."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rwkv_serve_client import RWKVClient, StopReason, TextDelta, TurnResult, TurnStarted, UnavailableError
from service.stack import redis_server_binary
from tests.conftest import free_port
from tests.test_e2e import Twin
from worker.tokenizer import WorldTokenizer

MODEL = "tiny"
WORKER_ENV = {
    "RWKV_WORKER_MODEL_ID": MODEL, "RWKV_WORKER_TORCH_THREADS": "1", "RWKV_WORKER_MAX_BATCH": "8",
    "RWKV_WORKER_PREFILL_CHUNK": "8",  # slow prefill: a window between a long turn's start and its first delta
    "RWKV_WORKER_LEASE_MS": "3000", "RWKV_WORKER_HEARTBEAT_S": "0.3", "RWKV_WORKER_REGISTRY_TTL_MS": "2000",
    "RWKV_WORKER_DRAIN_S": "10", "RWKV_WORKER_GRACE_S": "2",
    "RWKV_WORKER_REDIS_TIMEOUT_S": "1", "RWKV_WORKER_REDIS_CONNECT_TIMEOUT_S": "1",
}
FRONT_ENV = {
    "RWKV_FRONT_AUTH_MODE": "dev", "RWKV_FRONT_DISCOVERY_INTERVAL_S": "0.1", "RWKV_FRONT_GRACE_S": "8",
    "RWKV_FRONT_REDIS_TIMEOUT_S": "1", "RWKV_FRONT_REDIS_CONNECT_TIMEOUT_S": "1",
}


def _wait(check, what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def _health(target: str) -> int | None:
    """The target's overall health status, or None when it does not answer."""
    try:
        with grpc.insecure_channel(target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return None


class Cluster:
    """Redis (append-only file), workers and fronts as child processes; logs in the work directory."""

    def __init__(self, workdir: Path, checkpoint: Path) -> None:
        self.workdir, self.checkpoint = workdir, checkpoint
        self.redis_port = free_port()
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis_proc: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.fronts: dict[str, subprocess.Popen] = {}  # by target
        self._count = 0
        self.db = redis.Redis.from_url(self.url, socket_timeout=2)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self._redis_answers, "redis-server", 10)

    def _redis_answers(self) -> bool:
        try:
            return bool(self.db.ping())
        except redis.RedisError:
            return False

    def stop_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.terminate()  # SIGTERM: redis fsyncs its append-only file and exits
        self.redis_proc.wait(10)

    def start_worker(self) -> str:
        worker_id = f"w{self._count}"
        self._count += 1
        self.workers[worker_id] = self._spawn(worker_id, ["-m", "worker.server", "--host", "127.0.0.1", "--port", "0",
                                                          "--worker-id", worker_id],
                                              {**WORKER_ENV, "RWKV_WORKER_REDIS_URL": self.url,
                                               "RWKV_WORKER_MODEL_PATH": str(self.checkpoint)})
        return worker_id

    def wait_workers(self, *worker_ids: str) -> None:
        _wait(lambda: all(self.db.exists(f"rwkv:worker:{w}") for w in worker_ids), f"workers {worker_ids}", 120)

    def start_front(self, wait: bool = True) -> str:
        target = f"127.0.0.1:{free_port()}"
        self.fronts[target] = self._spawn(f"front-{target.rsplit(':', 1)[1]}",
                                          ["-m", "service.server", "--host", "127.0.0.1", "--port",
                                           target.rsplit(":", 1)[1]], {**FRONT_ENV, "RWKV_FRONT_REDIS_URL": self.url})
        if wait:
            self.wait_front(target)
        return target

    def wait_front(self, target: str) -> None:
        _wait(lambda: _health(target) == health_pb2.HealthCheckResponse.SERVING, "front", 60, 0.1)

    @property
    def target(self) -> str:
        """A live front."""
        return next(t for t, p in self.fronts.items() if p.poll() is None)

    def live_workers(self) -> list[str]:
        return [w for w, p in self.workers.items() if p.poll() is None]

    def worker_address(self, worker_id: str) -> str:
        return json.loads(self.db.get(f"rwkv:worker:{worker_id}"))["address"]

    def kill(self, worker_id: str) -> None:
        proc = self.workers[worker_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stored(self, sid: str) -> tuple[dict, bytes | None]:
        return self.db.hgetall(f"rwkv:{{{sid}}}:meta"), self.db.get(f"rwkv:{{{sid}}}:state")

    def close(self) -> None:
        for proc in [*self.fronts.values(), *self.workers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.fronts.values(), *self.workers.values()]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.stop_redis()
        self.db.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("chaos"), tiny_checkpoint)
    try:
        cluster.start_redis()
        workers = [cluster.start_worker() for _ in range(3)]  # started together: they load in parallel
        cluster.wait_workers(*workers)
        cluster.start_front()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def twin_parts(tiny_model) -> tuple[object, WorldTokenizer]:
    return tiny_model, WorldTokenizer()


def _twin(parts) -> Twin:
    return Twin(*parts)


def _session(rwkv: RWKVClient, max_tokens: int = 12) -> str:
    return rwkv.create_session(MODEL, temperature=0, max_tokens=max_tokens).session_id


def test_worker_killed_mid_reply_gives_a_retryable_error_and_the_session_goes_on(cluster: Cluster, twin_parts) -> None:
    with RWKVClient(cluster.target) as rwkv:
        sid = _session(rwkv)
        twin = _twin(twin_parts)
        first = rwkv.say(sid, "My name is Ada.", return_token_ids=True)
        assert (first.text, first.token_ids) == twin.turn("My name is Ada.", 12)
        committed = cluster.stored(sid)
        with rwkv.chat_stream(sid) as stream:
            stream.send("Tell me a very long story.", max_tokens=4000)
            started = next(stream)
            assert isinstance(started, TurnStarted)
            deltas = 0
            while deltas < 3:
                deltas += isinstance(next(stream), TextDelta)
            cluster.kill(started.worker_id)  # the reply is streaming: a rerun would repeat text
            began = time.monotonic()
            with pytest.raises(UnavailableError) as lost:
                for _ in stream:
                    pass
        assert time.monotonic() - began < 2 and lost.value.retry_after_s == 0  # retry now: the lease is gone
        assert "lost worker" in lost.value.message
        assert not cluster.db.exists(f"rwkv:{{{sid}}}:lease")
        assert cluster.stored(sid) == committed  # the dead worker's turn left nothing behind
        second = rwkv.say(sid, "What is my name?", return_token_ids=True)
        assert second.worker_id != started.worker_id and second.state_version == 2
        assert (second.text, second.token_ids) == twin.turn("What is my name?", 12)


def test_worker_killed_before_its_first_delta_reruns_the_turn_elsewhere(cluster: Cluster, twin_parts) -> None:
    with RWKVClient(cluster.target) as rwkv:
        sid = _session(rwkv, max_tokens=8)
        twin = _twin(twin_parts)
        assert rwkv.say(sid, "Hello.", return_token_ids=True).token_ids == twin.turn("Hello.", 8)[1]
        long_prompt = "Please read all of this. " * 250  # ~1500 tokens, fed 8 per engine step
        with rwkv.chat_stream(sid) as stream:
            stream.send(long_prompt, return_token_ids=True)
            started = next(stream)
            cluster.kill(started.worker_id)  # still prefilling: nothing has reached the client
            cluster.start_worker()  # a replacement for the next test loads meanwhile
            events = list(stream.until_turn_end())
        restarted = [e for e in events if isinstance(e, TurnStarted)]
        result = events[-1]
        assert len(restarted) == 1 and restarted[0].worker_id != started.worker_id
        assert isinstance(result, TurnResult) and result.state_version == 2
        assert (result.text, result.token_ids) == twin.turn(long_prompt, 8)  # run once, from the committed state
        meta, _ = cluster.stored(sid)
        assert meta[b"version"] == b"2" and meta[b"turns"] == b"2"
        assert rwkv.say(sid, "Again.", return_token_ids=True).token_ids == twin.turn("Again.", 8)[1]


def test_worker_sigterm_under_load_finishes_its_turns_and_takes_no_new_ones(cluster: Cluster) -> None:
    live = cluster.live_workers()
    cluster.wait_workers(*live)
    assert len(live) == 2
    results: dict[int, TurnResult | Exception] = {}
    started: dict[int, str] = {}
    streaming = threading.Barrier(7)

    def converse(i: int, rwkv: RWKVClient, sid: str) -> None:
        try:
            with rwkv.chat_stream(sid) as stream:
                stream.send(f"Session {i}: write at length.", max_tokens=200)
                for event in stream.until_turn_end():
                    if isinstance(event, TurnStarted):
                        started[i] = event.worker_id
                    elif isinstance(event, TextDelta) and i not in results and not streaming.broken:
                        results[i] = None  # type: ignore[assignment]
                        streaming.wait(30)
                    elif isinstance(event, TurnResult):
                        results[i] = event
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    with RWKVClient(cluster.target) as rwkv:
        sids = [_session(rwkv) for _ in range(6)]
        threads = [threading.Thread(target=converse, args=(i, rwkv, sid)) for i, sid in enumerate(sids)]
        for thread in threads:
            thread.start()
        streaming.wait(60)  # all six are streaming
        doomed = max(live, key=lambda w: sum(1 for v in started.values() if v == w))
        (survivor,) = [w for w in live if w != doomed]
        assert any(v == doomed for v in started.values())
        address = cluster.worker_address(doomed)
        proc = cluster.workers[doomed]
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING", 5, 0.01)
        newcomer = rwkv.say(_session(rwkv, max_tokens=3), "I came after the SIGTERM.")
        assert newcomer.worker_id == survivor  # no new turns on the draining worker
        for thread in threads:
            thread.join(60)
        assert proc.wait(15) == 0 and time.monotonic() - stopped_at < 10 + 2 + 3  # drain_s + grace_s + margin
    assert all(isinstance(r, TurnResult) for r in results.values()), results
    for i, sid in enumerate(sids):  # every turn, the draining worker's included, finished and committed
        assert results[i].stop_reason is not StopReason.CANCELLED and results[i].state_version == 1
        assert cluster.stored(sid)[0][b"version"] == b"1"


def test_front_sigterm_drains_and_a_new_front_carries_the_sessions_on(cluster: Cluster, twin_parts) -> None:
    old = cluster.target
    with RWKVClient(old) as rwkv:
        sid = _session(rwkv)
        twin = _twin(twin_parts)
        assert rwkv.say(sid, "First, via the old front.", return_token_ids=True).token_ids == \
            twin.turn("First, via the old front.", 12)[1]
        long_sid = _session(rwkv)
        with rwkv.chat_stream(long_sid) as stream:
            stream.send("Keep going while the front stops.", max_tokens=200)
            while not isinstance(next(stream), TextDelta):
                pass
            proc = cluster.fronts[old]
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            new = cluster.start_front(wait=False)  # its replacement starts meanwhile
            _wait(lambda: _health(old) != health_pb2.HealthCheckResponse.SERVING, "front NOT_SERVING", 5, 0.01)
            with RWKVClient(old) as other, pytest.raises(UnavailableError):  # no new turns while it drains
                other.say(_session(other), "Too late.")
            finished = list(stream.until_turn_end())[-1]  # the turn in flight finishes and commits
        assert isinstance(finished, TurnResult) and finished.state_version == 1
        assert proc.wait(15) == 0 and time.monotonic() - stopped_at < 8 + 3  # grace_s + margin
    cluster.wait_front(new)
    with RWKVClient(new) as rwkv:
        second = rwkv.say(sid, "Then, via the new front.", return_token_ids=True)
        assert second.state_version == 2
        assert second.token_ids == twin.turn("Then, via the new front.", 12)[1]


def test_redis_restart_is_unavailable_while_down_and_recovers_with_the_data(cluster: Cluster, twin_parts) -> None:
    """Last: it restarts Redis under every process (none is restarted)."""
    with RWKVClient(cluster.target, timeout=10) as rwkv:
        sid = _session(rwkv)
        twin = _twin(twin_parts)
        assert rwkv.say(sid, "Remember the number 42.", return_token_ids=True).token_ids == \
            twin.turn("Remember the number 42.", 12)[1]
        committed = cluster.stored(sid)
        cluster.stop_redis()
        for call in (lambda: rwkv.get_session(sid), lambda: rwkv.say(sid, "Anyone there?"),
                     lambda: rwkv.create_session(MODEL)):
            began = time.monotonic()
            with pytest.raises(UnavailableError) as down:
                call()
            assert time.monotonic() - began < 5, "a call hung on the dead Redis"
            assert down.value.retry_after_s  # "retry shortly"
        cluster.start_redis()  # same port, same append-only file
        cluster.wait_workers(*cluster.live_workers())  # their heartbeats register them again
        assert cluster.stored(sid) == committed  # the committed state survived the restart

        def answers() -> bool:
            try:
                rwkv.get_session(sid)
                return True
            except UnavailableError:
                return False

        _wait(answers, "front reconnects", 10, 0.1)
        again = rwkv.say(sid, "What was the number?", return_token_ids=True)
        assert again.state_version == 2 and again.token_ids == twin.turn("What was the number?", 12)[1]
        fresh = _session(rwkv)
        assert rwkv.say(fresh, "New here.").state_version == 1
