"""Service benchmark: what the front + worker + Redis path costs on top of the engine, on real processes.

Four measurements on a random-init checkpoint (default L12 D768; `--shape`, or `--quick` for a small model):
  1. aggregate decode tok/s through the front and one worker at concurrency 1, 8, 32, against the engine driven
     directly (worker.engine in a process of its own, same model, concurrency, prompt and max_tokens; greedy,
     stop token banned so every reply runs to max_tokens);
  2. latency of turn 100 against turn 1 of one session (same prompt, same max_tokens);
  3. state save + load through the store calls a worker's turn makes (`begin_turn`: lease + meta + state bytes in
     one round trip, as on a cache miss; `commit_and_release`: staging SET + compare-and-set script that also
     releases the lease, pipelined) against a raw Redis SET + GET of the same bytes, at the 12B state size and at
     the benchmark model's (`--only store` runs just this, on a redis-server of its own, and updates the JSON's
     store section in place);
  4. time to first token and inter-token latency (p50/p99) at 1, 8 and 32 concurrent sessions.

The processes are the real ones (`service.stack.Stack`: redis-server, `worker.server`, `service.server`); the
engine-direct side runs `worker.engine` in its own process, fed over a pipe, so neither side shares the client's
interpreter. Engine and front runs are interleaved (ABBA) over several rounds; tables show medians, latency
percentiles pool every sample of every round. Usage: `python -m bench.bench_service [--quick] [--shape 12x768]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_ID = "bench"
# The 12B RWKV-5 World shape: 32 layers, 5120 wide, 80 heads of 64 -> 43,253,760 state bytes per session.
STATE_12B = {"n_layer": 32, "n_embd": 5120, "n_head": 80, "head_size": 64}
PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall."
GOALS = {"throughput": 0.9, "turn_latency": 1.1, "state_io": 1.2}


def banned_ids(model_vocab: int) -> list[int]:
    """What greedy replies must never pick so that they run to max_tokens: token 0 (end of text), and the head's
    ids past the tokenizer's vocab (65530..65535 in World models), which a random model does pick and the
    tokenizer cannot decode (see docs/benchmarks.md)."""
    from worker.tokenizer import load_tokenizer

    return [0, *range(load_tokenizer(None).vocab_size, model_vocab)]


def checkout() -> dict:
    """The commit the benchmark ran on, and whether tracked files had local changes (None outside a checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain", "-uno").strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_summary(t0s: list[float], token_times: list[list[float]], ends: list[float], generated: int) -> dict:
    """Aggregate tok/s, TTFT and ITL samples of one concurrent run (times in perf_counter seconds)."""
    wall = max(ends) - min(t0s)
    ttft = [times[0] - t0 for t0, times in zip(t0s, token_times) if times]
    itl = [b - a for times in token_times for a, b in zip(times, times[1:])]
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall, "ttft_s": ttft, "itl_s": itl}


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

    def __init__(self, checkpoint: Path, max_batch: int, threads: int = 0) -> None:
        self.checkpoint = checkpoint
        self.max_batch = max_batch
        self.threads = threads
        self.redis: Any = None
        self.stack: Any = None
        self.client: Any = None
        self.store: Any = None

    async def start(self) -> None:
        from rwkv_serve_client import AsyncRWKVClient
        from service.stack import EmbeddedRedis, Stack, free_port
        from common.store import StateStore

        with contextlib.redirect_stdout(sys.stderr):
            self.redis = EmbeddedRedis.start()
            # The worker's default batch is 16: raised to the highest concurrency so both sides batch alike.
            env = {"RWKV_WORKER_MAX_BATCH": str(self.max_batch)}
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


async def turn_series(service: Service, turns: int, max_tokens: int, paired: int, banned: list[int]) -> dict:
    """`turns` sequential turns of one new session (latency send -> turn end, and TTFT, of each).

    Before each of the last `paired` turns, a fresh session runs its first turn: each late turn has a turn 1
    measured moments before it, so the ratio does not pick up drift in the machine's load over the series."""
    async def timed(sid: str) -> tuple[float, float]:
        t0, times, end, _ = await front_turn(service.client, sid, max_tokens, banned)
        return end - t0, (times[0] - t0 if times else float("nan"))

    sid = await service.new_session()
    latency, ttft, fresh, memory = [], [], [], {}
    for i in range(1, turns + 1):
        if i > turns - paired:
            fresh.append((await timed(await service.new_session()))[0])
        lat, first = await timed(sid)
        latency.append(lat)
        ttft.append(first)
        if i in (1, turns):
            memory[str(i)] = await service.session_bytes(sid)
    return {"latency_s": latency, "ttft_s": ttft, "fresh_turn_1_s": fresh, "session_redis_bytes": memory}


# ---- state save + load ---------------------------------------------------------------------------------------------


async def state_io(store: Any, shape: dict, reps: int) -> dict:
    """The store calls of a worker's turn (worker/runner.py `_session_turn`, cache miss) vs raw SET + GET of the
    same record, interleaved; plus the record's (de)serialization, which a worker runs around the store path.

    A turn: begin_turn (lease + meta + state, one round trip), the engine, commit_and_release (one round trip).
    Here a save + load is a commit_and_release followed by the next turn's begin_turn, whose lease the following
    repetition commits on, so each repetition times exactly the two calls of a turn."""
    import torch

    from worker.state import State, state_from_bytes, state_to_bytes

    L, D, H, N = shape["n_layer"], shape["n_embd"], shape["n_head"], shape["head_size"]
    g = torch.Generator().manual_seed(0)
    state = State(torch.randn(L, 1, D, generator=g), torch.randn(L, 1, H, N, N, generator=g),
                  torch.randn(L, 1, D, generator=g))
    fingerprint = bytes(32)
    data = state_to_bytes(state, fingerprint, 1)
    meta = await store.create_session(tenant="bench", model=MODEL_ID, template="raw", ttl_ms=3_600_000)
    sid, raw_key = meta.session_id, f"bench:raw:{meta.session_id}"
    r = store.redis
    version = 0
    samples: dict[str, list[float]] = {k: [] for k in ("raw", "store", "commit", "begin", "to_bytes", "from_bytes")}
    lease, _, _ = await store.begin_turn(sid, 30_000, holder="bench")

    async def raw() -> None:
        t = time.perf_counter()
        await r.set(raw_key, data)
        got = await r.get(raw_key)
        samples["raw"].append(time.perf_counter() - t)
        assert len(got) == len(data)

    async def through_store() -> None:
        nonlocal version, lease
        t = [time.perf_counter()]
        version = await store.commit_and_release(lease, version, data, state_tokens=1)  # the turn's save
        t.append(time.perf_counter())
        lease, stored, got = await store.begin_turn(sid, 30_000, holder="bench")  # the next turn's load
        t.append(time.perf_counter())
        assert stored.version == version and got is not None and len(got) == len(data)
        for name, a, b in zip(("commit", "begin"), t, t[1:]):
            samples[name].append(b - a)
        samples["store"].append(t[-1] - t[0])

    await raw()  # warm-up: first allocation of the value in Redis and of the client's read buffers
    await through_store()
    for key in samples:
        samples[key].clear()
    for i in range(reps):
        for step in ((raw, through_store) if i % 2 == 0 else (through_store, raw)):
            await step()
        t = time.perf_counter()
        state_to_bytes(state, fingerprint, 1)
        samples["to_bytes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        state_from_bytes(data, fingerprint)
        samples["from_bytes"].append(time.perf_counter() - t)
    await store.release_lease(lease)
    await store.delete_session(sid)
    await r.delete(raw_key)
    return {"record_bytes": len(data), "state_bytes": state.nbytes, "median_s": {k: statistics.median(v)
                                                                                  for k, v in samples.items()},
            "samples_s": samples}


# ---- orchestration -------------------------------------------------------------------------------------------------


async def bench(cfg: dict, checkpoint: Path) -> dict:
    """Starts the processes, runs the rounds and the state measurements, stops everything; the raw results."""
    concurrencies: list[int] = cfg["concurrency"]
    service = Service(checkpoint, max(concurrencies), cfg["torch_threads"])
    engine: EngineProcess | None = None

    def log(text: str) -> None:
        print(f"[bench_service {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    out: dict[str, Any] = {"throughput": {str(c): {"engine": [], "front": []} for c in concurrencies},
                           "turns": [], "state_io": {}}
    try:
        log("starting redis-server, worker, front and the engine child")
        await service.start()
        engine = await EngineProcess.start(checkpoint, max(concurrencies), cfg["torch_threads"])
        models = await service.client.list_models()
        info = next(m for m in models if m.id == MODEL_ID)
        out["model"] = {"n_layer": info.n_layer, "n_embd": info.n_embd, "n_head": info.n_head,
                        "state_bytes": info.state_bytes}
        banned = banned_ids(info.vocab_size)
        sids = [await service.new_session() for _ in range(max(concurrencies))]
        log("warm-up (each session's first turn; every batch size once on both sides)")
        for c in concurrencies:
            await engine.run(c, 4, banned)
            await service.run(sids[:c], 4, banned)
        for r in range(cfg["rounds"]):
            order = concurrencies if r % 2 == 0 else concurrencies[::-1]
            for i, c in enumerate(order):
                sides = ("engine", "front") if (r + i) % 2 == 0 else ("front", "engine")
                for side in sides:
                    if side == "engine":
                        res = await engine.run(c, cfg["max_tokens"], banned)
                    else:
                        res = await service.run(sids[:c], cfg["max_tokens"], banned)
                    if res["generated"] != c * cfg["max_tokens"]:  # a reply ended early: tok/s would mislead
                        raise RuntimeError(f"{side} at concurrency {c} generated {res['generated']} tokens, "
                                           f"not {c} x {cfg['max_tokens']}")
                    out["throughput"][str(c)][side].append(res)
                    log(f"round {r + 1}/{cfg['rounds']} concurrency {c} {side}: {res['tok_s']:.1f} tok/s")
            series = await turn_series(service, cfg["turns"], cfg["turn_max_tokens"], cfg["paired"], banned)
            out["turns"].append(series)
            log(f"round {r + 1}/{cfg['rounds']} {cfg['turns']} turns: turn 1 {series['latency_s'][0] * 1e3:.0f} ms, "
                f"turn {cfg['turns']} {series['latency_s'][-1] * 1e3:.0f} ms")
        # The state store needs no model: run it last, with the engines idle.
        await engine.stop()
        for name, shape, reps in (("12B", STATE_12B, cfg["state_reps_12b"]),
                                  ("bench model", {**out["model"], "head_size": info.n_embd // info.n_head},
                                   cfg["state_reps_model"])):
            out["state_io"][name] = await state_io(service.store, shape, reps)
            med = out["state_io"][name]["median_s"]
            log(f"state {name}: raw {med['raw'] * 1e3:.1f} ms, store {med['store'] * 1e3:.1f} ms")
    finally:
        if engine is not None:
            await engine.stop()
        await service.stop()
    return out


def summarize(cfg: dict, raw: dict) -> dict:
    """Medians, pooled percentiles and the ratios against the goals."""
    thr, lat, cpu = {}, {}, {}
    for c, sides in raw["throughput"].items():
        thr[c] = {side: statistics.median(r["tok_s"] for r in runs) for side, runs in sides.items()}
        thr[c]["ratio"] = thr[c]["front"] / thr[c]["engine"]
        # Each round's front run sat next to its engine run: their ratio cancels most of the load drift.
        thr[c]["ratio_paired"] = statistics.median(
            f["tok_s"] / e["tok_s"] for f, e in zip(sides["front"], sides["engine"]))
        lat[c] = {}
        for side, runs in sides.items():
            ttft = [x for r in runs for x in r["ttft_s"]]
            itl = [x for r in runs for x in r["itl_s"]]
            lat[c][side] = {"ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
                            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
                            "ttft_samples": len(ttft), "itl_samples": len(itl)}
            procs = runs[0]["cpu_s"].keys()
            cpu[f"{side}@{c}"] = {p: statistics.median(r["cpu_s"][p] / r["generated"] for r in runs) * 1e3
                                  for p in procs}
    n, k = cfg["turns"], cfg["paired"]
    pairs = [late / first for series in raw["turns"]
             for first, late in zip(series["fresh_turn_1_s"], series["latency_s"][-k:])]

    def slope(ys: list[float]) -> float:  # least squares, seconds per turn
        xs = range(1, len(ys) + 1)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    series = raw["turns"]
    turns = {
        "fresh_turn_1_ms": statistics.median(x for s in series for x in s["fresh_turn_1_s"]) * 1e3,
        "late_turns_ms": statistics.median(x for s in series for x in s["latency_s"][-k:]) * 1e3,
        "ratio_paired": statistics.median(pairs),
        "pairs": len(pairs),
        "turn_1_ms": statistics.median(s["latency_s"][0] for s in series) * 1e3,
        f"turn_{n}_ms": statistics.median(s["latency_s"][-1] for s in series) * 1e3,
        "ratio_same_session": statistics.median(s["latency_s"][-1] / s["latency_s"][0] for s in series),
        "slope_ms_per_turn": statistics.median(slope(s["latency_s"]) for s in series) * 1e3,
        "ttft_turn_1_ms": statistics.median(s["ttft_s"][0] for s in series) * 1e3,
        f"ttft_turn_{n}_ms": statistics.median(s["ttft_s"][-1] for s in series) * 1e3,
        "session_redis_bytes": series[0]["session_redis_bytes"],
    }
    state = summarize_state(raw["state_io"])
    ratios = {f"throughput_front_vs_engine@{c}": v["ratio_paired"] for c, v in thr.items()}
    ratios[f"turn_{n}_vs_turn_1"] = turns["ratio_paired"]
    ratios.update({f"state_store_vs_raw@{name}": v["ratio"] for name, v in state.items()})
    return {"throughput_tok_s": thr, "latency": lat, "cpu_ms_per_token": cpu, "turns": turns, "state_io": state,
            "ratios": ratios}


def compact(raw: dict) -> dict:
    """The raw results without per-token samples (their percentiles are in the summary): a JSON worth committing."""
    drop = {"ttft_s", "itl_s"}
    throughput = {c: {side: [{k: v for k, v in run.items() if k not in drop} for run in runs]
                      for side, runs in sides.items()} for c, sides in raw["throughput"].items()}
    state_io = {name: {k: v for k, v in res.items() if k != "samples_s"} for name, res in raw["state_io"].items()}
    return {**raw, "throughput": throughput, "state_io": state_io}


def goal_of(key: str) -> tuple[str, float]:
    if key.startswith("throughput"):
        return ">=", GOALS["throughput"]
    if key.startswith("turn"):
        return "<=", GOALS["turn_latency"]
    return "<=", GOALS["state_io"]


def print_report(cfg: dict, summary: dict, model: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=150)  # the tables are wide; a pipe would otherwise get 80 columns
    shape = f"L{model['n_layer']} D{model['n_embd']}"
    t = Table(title=f"Aggregate decode tok/s, {shape} random fp32, {cfg['max_tokens']} tokens/reply, greedy, "
                    f"medians of {cfg['rounds']} interleaved rounds")
    for col in ("concurrency", "engine direct", "front + worker", "ratio of medians", "median of per-round ratios",
                "goal"):
        t.add_column(col, justify="right")
    for conc, v in summary["throughput_tok_s"].items():
        t.add_row(conc, f"{v['engine']:.1f}", f"{v['front']:.1f}", f"{v['ratio']:.2f}", f"{v['ratio_paired']:.2f}",
                  f">= {GOALS['throughput']}")
    c.print(t)

    t = Table(title="Time to first token and inter-token latency (ms), all samples of all rounds pooled")
    for col in ("concurrency", "path", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "samples (TTFT/ITL)"):
        t.add_column(col, justify="right")
    for conc, sides in summary["latency"].items():
        for side in ("front", "engine"):
            v = sides[side]
            t.add_row(conc, "front + worker" if side == "front" else "engine direct", f"{v['ttft_p50_ms']:.1f}",
                      f"{v['ttft_p99_ms']:.1f}", f"{v['itl_p50_ms']:.1f}", f"{v['itl_p99_ms']:.1f}",
                      f"{v['ttft_samples']}/{v['itl_samples']}")
    c.print(t)

    tu = summary["turns"]
    n, k = cfg["turns"], cfg["paired"]
    t = Table(title=f"One session, {n} turns of {cfg['turn_max_tokens']} tokens (same prompt); latency send -> turn "
                    f"end, ms (medians over rounds)")
    for col in ("turn 1", f"turn {n}", "ratio", f"turn 1 of {k} fresh sessions", f"turns {n - k + 1}-{n}",
                "paired ratio", "slope ms/turn", f"Redis bytes turn 1 / {n}"):
        t.add_column(col, justify="right")
    mem = tu["session_redis_bytes"]
    t.add_row(f"{tu['turn_1_ms']:.1f}", f"{tu[f'turn_{n}_ms']:.1f}", f"{tu['ratio_same_session']:.2f}",
              f"{tu['fresh_turn_1_ms']:.1f}", f"{tu['late_turns_ms']:.1f}", f"{tu['ratio_paired']:.2f}",
              f"{tu['slope_ms_per_turn']:+.3f}", f"{mem.get('1', 0):,} / {mem.get(str(n), 0):,}")
    c.print(t)

    print_state_io(c, summary["state_io"])

    t = Table(title="CPU ms per generated token, by process (medians)")
    procs = ["engine", "worker", "front", "client", "redis"]
    t.add_column("run", justify="right")
    for p in procs:
        t.add_column(p, justify="right")
    for run, v in summary["cpu_ms_per_token"].items():
        t.add_row(run, *(f"{v[p]:.2f}" if p in v else "-" for p in procs))
    c.print(t)

    for key, value in summary["ratios"].items():
        op, goal = goal_of(key)
        ok = value >= goal if op == ">=" else value <= goal
        c.print(f"{key}: {value:.2f} (goal {op} {goal}) {'[green]met[/green]' if ok else '[red]missed[/red]'}")
    c.print(f"JSON: {out}")


def print_state_io(c: Any, state_io: dict) -> None:
    from rich.table import Table

    t = Table(title="State save + load (ms, medians): a turn's store calls vs raw SET+GET of the same record")
    for col in ("state", "record bytes", "raw SET+GET", "store total", "commit_and_release", "begin_turn",
                "ratio", "to_bytes", "from_bytes"):
        t.add_column(col, justify="right")
    for name, v in state_io.items():
        t.add_row(name, f"{v['record_bytes']:,}", f"{v['raw_ms']:.2f}", f"{v['store_ms']:.2f}", f"{v['commit_ms']:.2f}",
                  f"{v['begin_ms']:.2f}", f"{v['ratio']:.2f}", f"{v['to_bytes_ms']:.2f}", f"{v['from_bytes_ms']:.2f}")
    c.print(t)


def summarize_state(raw_state_io: dict) -> dict:
    state = {}
    for name, res in raw_state_io.items():
        med = res["median_s"]
        state[name] = {"record_bytes": res["record_bytes"], "state_bytes": res["state_bytes"],
                       **{f"{k}_ms": v * 1e3 for k, v in med.items()}, "ratio": med["store"] / med["raw"],
                       "raw_gb_s": 2 * res["record_bytes"] / med["raw"] / 1e9}
    return state


async def bench_store(cfg: dict, n_layer: int, n_embd: int) -> dict:
    """Section 3 alone: a redis-server of its own, no model (the state is random; a random checkpoint's heads are
    64 wide, so the model's state shape follows from --shape)."""
    from service.stack import EmbeddedRedis
    from common.store import StateStore

    with contextlib.redirect_stdout(sys.stderr):
        redis = EmbeddedRedis.start()
    store = StateStore.from_url(redis.url)
    out: dict[str, Any] = {}
    try:
        model = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // 64, "head_size": 64}
        for name, shape, reps in (("12B", STATE_12B, cfg["state_reps_12b"]),
                                  ("bench model", model, cfg["state_reps_model"])):
            out[name] = await state_io(store, shape, reps)
            med = out[name]["median_s"]
            print(f"[bench_service] state {name}: raw {med['raw'] * 1e3:.2f} ms, store {med['store'] * 1e3:.2f} ms",
                  file=sys.stderr, flush=True)
    finally:
        await store.close()
        with contextlib.redirect_stdout(sys.stderr):
            redis.stop()
    return out


def store_only(cfg: dict, n_layer: int, n_embd: int, out: Path) -> None:
    """Runs section 3 and replaces the store section of `out` (other sections kept as they are)."""
    from rich.console import Console

    started, load_before = time.perf_counter(), os.getloadavg()
    raw = asyncio.run(bench_store(cfg, n_layer, n_embd))
    state = summarize_state(raw)
    report = json.loads(out.read_text()) if out.exists() else {"summary": {"ratios": {}}, "raw": {}}
    report["summary"]["state_io"] = state
    report["summary"]["ratios"].update({f"state_store_vs_raw@{name}": v["ratio"] for name, v in state.items()})
    report["raw"]["state_io"] = {name: {k: v for k, v in res.items() if k != "samples_s"} for name, res in raw.items()}
    report["state_io_run"] = {  # the store section comes from a run of its own
        "config": {"shape": f"{n_layer}x{n_embd}", "state_reps_model": cfg["state_reps_model"],
                   "state_reps_12b": cfg["state_reps_12b"]},
        "code": checkout(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "duration_s": time.perf_counter() - started},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    c = Console(width=150)
    print_state_io(c, state)
    for name, v in state.items():
        ok = v["ratio"] <= GOALS["state_io"]
        c.print(f"state_store_vs_raw@{name}: {v['ratio']:.2f} (goal <= {GOALS['state_io']}) "
                f"{'[green]met[/green]' if ok else '[red]missed[/red]'}")
    c.print(f"JSON: {out}")


def main(
    shape: str = typer.Option("12x768", help="n_layer x n_embd of the random checkpoint"),
    quick: bool = typer.Option(False, help="a small model (2x128), one round, shorter replies: a fast smoke run"),
    rounds: int = typer.Option(3, help="interleaved rounds"),
    max_tokens: int = typer.Option(64, help="tokens per reply in the throughput and latency runs"),
    turns: int = typer.Option(100, help="turns of the one-session latency series"),
    turn_max_tokens: int = typer.Option(16, help="tokens per reply in the turn series"),
    paired: int = typer.Option(5, help="last turns of the series each paired with a fresh session's turn 1"),
    concurrency: str = typer.Option("1,8,32", help="concurrent sessions, comma-separated"),
    state_reps: int = typer.Option(15, help="interleaved repetitions of the state save + load at the model's size"),
    torch_threads: int = typer.Option(0, help="intra-op threads of the worker and the engine (0: torch's default)"),
    out: Path = typer.Option(RESULTS / "service.json"),
    only: str = typer.Option("", help="'store': only the state save + load section (updates that section of --out)"),
    engine_child_ckpt: str = typer.Option("", "--engine-child", hidden=True),
    max_batch: int = typer.Option(32, hidden=True),
) -> None:
    """Benchmark the service path against the engine; print tables and write JSON."""
    if engine_child_ckpt:
        asyncio.run(engine_child(engine_child_ckpt, max_batch, torch_threads))
        return
    if quick:
        shape, rounds, max_tokens, state_reps = "2x128", 1, 32, 5
    n_layer, n_embd = (int(v) for v in shape.split("x"))
    cfg = {"shape": shape, "quick": quick, "rounds": rounds, "max_tokens": max_tokens, "turns": turns,
           "turn_max_tokens": turn_max_tokens, "paired": paired, "torch_threads": torch_threads,
           "concurrency": [int(c) for c in concurrency.split(",")],
           "state_reps_model": state_reps, "state_reps_12b": max(3, state_reps // 3), "prompt": PROMPT}
    if only:
        if only != "store":
            raise typer.BadParameter("--only takes 'store'")
        store_only(cfg, n_layer, n_embd, out)
        return
    from worker.checkpoint import make_random_checkpoint

    ckpt = ROOT / "bench" / ".cache" / f"random-L{n_layer}-D{n_embd}-fp32.pth"
    if not ckpt.exists():
        make_random_checkpoint(ckpt, n_layer, n_embd, seed=0)
    load_before = os.getloadavg()
    started = time.perf_counter()
    raw = asyncio.run(bench(cfg, ckpt))
    summary = summarize(cfg, raw)
    report = {
        "config": cfg,
        "code": checkout(),
        "model": raw["model"],
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "duration_s": time.perf_counter() - started},
        "summary": summary,
        "raw": compact(raw),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(cfg, summary, raw["model"], out)


if __name__ == "__main__":
    typer.run(main)
