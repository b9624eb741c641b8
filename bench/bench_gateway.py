"""Gateway vs gRPC: aggregate tok/s of concurrent streamed completions through the HTTP gateway and straight through
the front, on one stack of real processes (Redis, a worker, the front, the gateway as rwkv-stack starts them).

  python -m bench.bench_gateway --shape 12x768 --concurrency 1,8,32 --max-tokens 64 --rounds 3

Both paths run the same stateless completion (the raw prompt, greedy, end of text and the ids past the vocab
banned so every stream runs to max_tokens), interleaved ABBA per concurrency level; the ratio at a level is the
median over rounds of gateway / the gRPC run beside it (the shared machine's load moves both alike within a
round). gRPC: the SDK's AsyncRWKVClient.generate(). HTTP: POST /v1/completions with stream: true read as raw
SSE lines by httpx2 (the openai SDK's transport; its pydantic parsing per chunk is client cost, not the
gateway's), the bans as logit_bias -100. Goal: the gateway's aggregate tok/s >= 0.9x gRPC's at each level.
Table + bench/results/gateway.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import typer

from bench.service_common import MODEL_ID, PROMPT, RESULTS, ROOT, banned_ids, checkout, cpu_seconds, machine, pct

GOAL = 0.9


async def grpc_stream(client: Any, max_tokens: int, banned: list[int]) -> tuple[float, float | None, float, int]:
    from rwkv_serve_client import TurnResult

    t0, first, generated = time.perf_counter(), None, 0
    async for item in client.generate(PROMPT, model=MODEL_ID, max_tokens=max_tokens, temperature=0.0,
                                      banned_tokens=banned, timeout=600):
        if isinstance(item, TurnResult):
            generated = item.usage.generated_tokens
        elif first is None:
            first = time.perf_counter()
    return t0, first, time.perf_counter(), generated


async def http_stream(http: Any, url: str, max_tokens: int,
                      banned: list[int]) -> tuple[float, float | None, float, int]:
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(t): -100 for t in banned}}
    t0, first, generated = time.perf_counter(), None, 0
    async with http.stream("POST", url, json=body, headers={"Authorization": "Bearer bench"}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    return t0, first, time.perf_counter(), generated


def summary(results: list[tuple[float, float | None, float, int]]) -> dict[str, Any]:
    t0s, firsts, ends, generated = zip(*results)
    wall = max(ends) - min(t0s)
    return {"wall_s": wall, "generated": sum(generated), "tok_s": sum(generated) / wall,
            "ttft_s": [f - t for t, f in zip(t0s, firsts) if f is not None]}


async def measure(args: dict[str, Any]) -> dict[str, Any]:
    import httpx2

    from rwkv_serve_client import AsyncRWKVClient
    from service.stack import EmbeddedRedis, Stack, free_port
    from worker.checkpoint import make_random_checkpoint

    n_layer, n_embd = (int(v) for v in args["shape"].split("x"))
    ckpt = ROOT / "bench" / ".cache" / f"random-L{n_layer}-D{n_embd}-fp32.pth"
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        make_random_checkpoint(ckpt, n_layer, n_embd, seed=0)
    levels, max_tokens, rounds = args["concurrency"], args["max_tokens"], args["rounds"]
    top = max(levels)
    env = {"RWKV_WORKER_MAX_BATCH": str(top), "RWKV_WORKER_MAX_QUEUED": str(2 * top),
           "RWKV_FRONT_DISCOVERY_INTERVAL_S": "1.0"}
    if args["threads"]:
        env["RWKV_WORKER_TORCH_THREADS"] = str(args["threads"])
    with contextlib.redirect_stdout(sys.stderr):
        redis = await asyncio.to_thread(EmbeddedRedis.start)
        stack = Stack(port=free_port(), http_port=free_port(), model=ckpt, model_id=MODEL_ID, redis_url=redis.url,
                      quiet=True, extra_env=env)
        await asyncio.to_thread(stack.start)
    (worker,) = stack.worker_procs.values()
    pids = {"worker": worker.pid, "front": stack.procs[-2].pid, "gateway": stack.procs[-1].pid}
    url = f"{stack.http_base}/v1/completions"
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {"grpc": {}, "gateway": {}}
    try:
        async with AsyncRWKVClient(stack.target, timeout=600) as client, \
                httpx2.AsyncClient(timeout=600, limits=httpx2.Limits(max_connections=2 * top)) as http:
            info = (await client.list_models())[0]
            banned = banned_ids(info.vocab_size)

            async def run(path: str, c: int) -> dict[str, Any]:
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                if path == "grpc":
                    results = await asyncio.gather(*(grpc_stream(client, max_tokens, banned) for _ in range(c)))
                else:
                    results = await asyncio.gather(*(http_stream(http, url, max_tokens, banned) for _ in range(c)))
                out = summary(list(results))
                out["cpu_s"] = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                assert out["generated"] == c * max_tokens, out["generated"]  # every stream ran to max_tokens
                return out

            for c in (1, top):  # warm-up: first-call costs (channels, connections, kernels) out of the way
                await run("grpc", c)
                await run("gateway", c)
            for r in range(rounds):
                for c in levels:
                    order = ("grpc", "gateway") if r % 2 == 0 else ("gateway", "grpc")
                    for path in order:
                        raw[path].setdefault(str(c), []).append(await run(path, c))
                        print(f"round {r} c={c} {path}: {raw[path][str(c)][-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            await asyncio.to_thread(stack.stop)
            redis.stop()
    model = {"n_layer": info.n_layer, "n_embd": info.n_embd, "n_head": info.n_head, "vocab_size": info.vocab_size}
    return {"raw": raw, "model": model}


def main(shape: str = typer.Option("12x768", help="n_layer x n_embd of the random checkpoint"),
         concurrency: str = typer.Option("1,8,32", help="concurrent streams, comma-separated"),
         max_tokens: int = typer.Option(64, help="tokens per stream"),
         rounds: int = typer.Option(3, help="interleaved rounds per level"),
         threads: int = typer.Option(0, help="RWKV_WORKER_TORCH_THREADS (0: torch's default)"),
         out: str = typer.Option(str(RESULTS / "gateway.json"), help="JSON results")) -> None:
    started, load = time.perf_counter(), os.getloadavg()
    args = {"shape": shape, "concurrency": [int(c) for c in concurrency.split(",")], "max_tokens": max_tokens,
            "rounds": rounds, "threads": threads}
    data = asyncio.run(measure(args))
    table, ratios = [], {}
    for c in args["concurrency"]:
        g = [run["tok_s"] for run in data["raw"]["grpc"][str(c)]]
        h = [run["tok_s"] for run in data["raw"]["gateway"][str(c)]]
        ratio = statistics.median(b / a for a, b in zip(g, h))  # per round: beside the gRPC run of that round
        ratios[f"throughput_c{c}"] = ratio
        cpu = statistics.median(run["cpu_s"]["gateway"] / run["generated"] * 1000
                                for run in data["raw"]["gateway"][str(c)])
        ttft = (pct([t for run in data["raw"]["grpc"][str(c)] for t in run["ttft_s"]], 50),
                pct([t for run in data["raw"]["gateway"][str(c)] for t in run["ttft_s"]], 50))
        table.append((c, statistics.median(g), statistics.median(h), ratio, ttft[0] * 1000, ttft[1] * 1000, cpu))
    print(f"model L{data['model']['n_layer']} D{data['model']['n_embd']} fp32, {max_tokens} tokens per stream, "
          f"{rounds} rounds (tok/s: median; ratio: median of the rounds' ratios)")
    print("| streams | gRPC tok/s | gateway tok/s | gateway / gRPC | TTFT p50 gRPC ms | TTFT p50 gateway ms "
          "| gateway CPU ms/token |")
    print("|---|---|---|---|---|---|---|")
    for c, g, h, ratio, tg, th, cpu in table:
        mark = "" if ratio >= GOAL else " (below goal)"
        print(f"| {c} | {g:.1f} | {h:.1f} | {ratio:.2f}x{mark} | {tg:.1f} | {th:.1f} | {cpu:.2f} |")
    result = {"config": args, "model": data["model"], "goal": {"throughput": GOAL}, "ratios": ratios,
              "raw": data["raw"], "checkout": checkout(), "machine": machine(load, started)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"JSON: {out}")


if __name__ == "__main__":
    typer.run(main)
