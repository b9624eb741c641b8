"""The processes the service benchmark drives: the engine in a child process, and Redis + worker + front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.service_common import MODEL_ID, PROMPT, ROOT, cpu_seconds, run_summary

# ---- the engine driven directly (child process) ------------------------------------------------------------------


async def engine_child(checkpoint: str, max_batch: int, threads: int) -> None:
    """Loads the model once, then runs one concurrent job per JSON line on stdin; answers one JSON line each."""
    import torch

    from worker.engine import Delta, Engine, Finished, TurnRequest
    from worker.model import RWKV5
    from worker.sampler import SamplingParams
    from worker.tokenizer import load_tokenizer

    if threads:  # as the worker does with RWKV_WORKER_TORCH_THREADS
        torch.set_num_threads(threads)
    model = RWKV5.from_checkpoint(checkpoint, dtype=torch.float32)
    tokenizer = load_tokenizer(None)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queued=64)
    engine.start()
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        job = json.loads(line)
        tokens = tokenizer.encode(job["text"])
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, banned_tokens=tuple(job["banned"]))
        states = [model.init_state(1) for _ in range(job["concurrency"])]
        cpu0 = time.process_time()

        async def one(state: Any) -> tuple[float, list[float], float, int]:
            t0 = time.perf_counter()
            turn = engine.submit(TurnRequest(tokens, params, state=state))
            times: list[float] = []
            async for event in turn:
                if isinstance(event, Delta) and event.token_ids:
                    times.append(time.perf_counter())
                elif isinstance(event, Finished):
                    return t0, times, time.perf_counter(), event.generated_tokens
            raise RuntimeError("turn ended without Finished")

        results = await asyncio.gather(*(one(s) for s in states))
        t0s, token_times, ends, generated = zip(*results)
        out = run_summary(list(t0s), list(token_times), list(ends), sum(generated))
        out["cpu_s"] = {"engine": time.process_time() - cpu0}
        out["prompt_tokens"] = len(tokens)
        print(json.dumps(out), flush=True)
    await engine.close()


class EngineProcess:
    """The parent's handle on the engine child."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, checkpoint: Path, max_batch: int, threads: int) -> EngineProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.bench_service", "--engine-child", str(checkpoint),
            "--max-batch", str(max_batch), "--torch-threads", str(threads),
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**26)
        self = cls(proc)
        await self._read()
        return self

    async def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine child exited ({await self.proc.wait()})")
        return json.loads(line)

    async def run(self, concurrency: int, max_tokens: int, banned: list[int]) -> dict:
        assert self.proc.stdin is not None
        job = {"concurrency": concurrency, "max_tokens": max_tokens, "text": PROMPT, "banned": banned}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._read()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# ---- through the front --------------------------------------------------------------------------------------------


async def front_turn(
    client: Any, sid: str, max_tokens: int, banned: list[int]
) -> tuple[float, list[float], float, int]:
    """One chat turn as the SDK's chat() runs it (send, events to turn end, half-close, drain), with timestamps
    of every token-bearing delta."""
    from rwkv_serve_client import TextDelta, TurnResult

    stream = client.chat_stream(sid, timeout=600)
    times: list[float] = []
    result: TurnResult | None = None
    try:
        t0 = time.perf_counter()
        await stream.send(PROMPT, return_token_ids=True, max_tokens=max_tokens, temperature=0.0, banned_tokens=banned)
        async for event in stream.until_turn_end():
            if isinstance(event, TextDelta) and event.token_ids:
                times.append(time.perf_counter())
            elif isinstance(event, TurnResult):
                result, end = event, time.perf_counter()
        await stream.done_sending()
        async for _ in stream:
            pass
    finally:
        stream.close()
    assert result is not None
    return t0, times, end, result.usage.generated_tokens


class Service:
    """Redis + one worker + a front as real processes, and an SDK client on the front."""

    def __init__(self, checkpoint: Path, max_batch: int, threads: int = 0, env: dict[str, str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.max_batch = max_batch
        self.threads = threads
        self.env = dict(env or {})  # more worker settings (RWKV_WORKER_*)
        self.redis: Any = None
        self.stack: Any = None
        self.client: Any = None
        self.store: Any = None

    async def start(self) -> None:
        from common.store import StateStore
        from rwkv_serve_client import AsyncRWKVClient
        from service.stack import EmbeddedRedis, Stack, free_port

        with contextlib.redirect_stdout(sys.stderr):
            self.redis = EmbeddedRedis.start()
            # The worker's default batch is 16: raised to the highest concurrency so both sides batch alike.
            env = {"RWKV_WORKER_MAX_BATCH": str(self.max_batch), **self.env}
            if self.threads:
                env["RWKV_WORKER_TORCH_THREADS"] = str(self.threads)
            self.stack = Stack(port=free_port(), model=self.checkpoint, model_id=MODEL_ID, redis_url=self.redis.url,
                               quiet=True, extra_env=env)
            await asyncio.to_thread(self.stack.start)
        self.client = AsyncRWKVClient(self.stack.target, timeout=600)
        self.store = StateStore.from_url(self.redis.url)

    def pids(self) -> dict[str, int]:
        (worker,) = self.stack.worker_procs.values()
        return {"worker": worker.pid, "front": self.stack.procs[-1].pid, "redis": self.redis.proc.pid}

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            await self.store.close()
        with contextlib.redirect_stdout(sys.stderr):
            if self.stack is not None:
                await asyncio.to_thread(self.stack.stop)
            if self.redis is not None:
                self.redis.stop()

    async def new_session(self) -> str:
        session = await self.client.create_session(MODEL_ID, template="raw")
        return session.session_id

    async def run(self, sids: list[str], max_tokens: int, banned: list[int]) -> dict:
        """One concurrent turn on each session; also the CPU time each process spent on it."""
        pids = self.pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        client0 = time.process_time()
        results = await asyncio.gather(*(front_turn(self.client, sid, max_tokens, banned) for sid in sids))
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        cpu["client"] = time.process_time() - client0
        t0s, token_times, ends, generated = zip(*results)
        out = run_summary(list(t0s), list(token_times), list(ends), sum(generated))
        out["cpu_s"] = cpu
        return out

    async def session_bytes(self, sid: str) -> int:
        """Redis memory of everything the session keeps (meta hash + state record)."""
        total = 0
        for part in ("meta", "state"):
            total += await self.store.redis.memory_usage(self.store.keys.session(sid, part)) or 0
        return total

