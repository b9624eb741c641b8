"""Prefix-cache benchmark: a 20-round stateless chat resent in full each round (Generate with messages), with the
shared prefix-state cache and with it disabled, in one run.

The worker's turn runner is driven in this process (engine on CPU, a small random model, a private redis-server:
what a worker does for a Generate(messages), without the front or gRPC). The two configurations alternate round by
round over the same conversation (the replies are greedy, the banned ids keep each reply at max_tokens, so both
configurations see the same messages; the replies are checked equal: the cache changes no output). Per round: the
prompt's tokens, the tokens actually prefilled (prompt - cached), and the wall time from request to turn_end.
Goal (issue 11): with the cache, round 20 within 1.2x of round 1.
Usage: `python -m bench.bench_prefix_cache [--rounds 20] [--shape 4x256] [--max-tokens 16]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from bench.service_common import RESULTS, banned_ids, checkout, machine

QUESTIONS = ["How do I read a file in Python?", "And write one?", "What does `with` do there?",
             "How do I list a directory?", "How do I walk it recursively?", "What is pathlib for?",
             "How do I join paths?", "How do I check that a file exists?", "How do I delete one?",
             "How do I copy a file?", "And move it?", "How do I read JSON?", "And write it back?",
             "What about CSV?", "How do I parse dates?", "How do I time code?", "What is a generator?",
             "When would I use one?", "How do I sort a list of dicts?", "Thanks, that is all."]


def start_redis(tmp: str) -> tuple[subprocess.Popen, str]:
    from service.stack import free_port, redis_server_binary

    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


async def bench(cfg: dict, checkpoint: Path, url: str) -> dict:
    import torch

    from common.store import StateStore
    from common.templates import Message
    from common.worker_api import TextDelta, TurnEnded, TurnInput
    from worker.engine import Engine
    from worker.model import RWKV5
    from worker.runner import RunnerConfig, TurnRunner
    from worker.state_cache import StateCache
    from worker.tokenizer import load_tokenizer

    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    model = RWKV5.from_checkpoint(checkpoint)
    tokenizer = load_tokenizer(None)
    store = StateStore.from_url(url)
    engine = Engine(model, tokenizer, max_batch=4)
    engine.start()
    runners = {label: TurnRunner(engine, store, tokenizer, RunnerConfig("bench", "w", prefix_cache=on,
                                                                        max_prompt_tokens=1 << 20),
                                 StateCache(0))
               for label, on in (("cache", True), ("no cache", False))}
    sampling = {"temperature": 0.0, "max_tokens": cfg["max_tokens"], "stop_token_ids": [],
                "banned_tokens": banned_ids(model.config.vocab_size)}
    messages = [Message("system", "You are a concise Python tutor.")]
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label in runners}
    for i in range(cfg["rounds"]):
        messages.append(Message("user", QUESTIONS[i % len(QUESTIONS)]))
        replies = {}
        for label, runner in (runners.items() if i % 2 == 0 else reversed(runners.items())):
            t0 = time.perf_counter()
            text, end = "", None
            async for event in runner.run(TurnInput(messages=tuple(messages), sampling=sampling)):
                if isinstance(event, TextDelta):
                    text += event.text
                elif isinstance(event, TurnEnded):
                    end = event
            wall = time.perf_counter() - t0
            await runner.prefixes.flush()  # the boundary writes run in the background: let them land
            assert end is not None
            replies[label] = text
            rows[label].append({"round": i + 1, "prompt_tokens": end.prompt_tokens, "cached_tokens": end.cached_tokens,
                                "prefilled_tokens": end.prompt_tokens - end.cached_tokens, "wall_s": wall})
        if len(set(replies.values())) != 1:
            raise AssertionError(f"round {i + 1}: the replies differ with and without the cache")
        messages.append(Message("assistant", replies["cache"]))
    entries, size = await store.prefix_usage("bench")
    await engine.close()
    await store.close()
    return {"rounds": rows, "prefix_cache": {"entries": entries, "bytes": size}}


def main(
    rounds: int = typer.Option(20, help="rounds of the conversation"),
    shape: str = typer.Option("4x256", help="random model, LAYERSxWIDTH"),
    max_tokens: int = typer.Option(16, help="tokens per reply"),
    torch_threads: int = typer.Option(1, help="intra-op threads; 0 = torch's default"),
    out: Path = typer.Option(RESULTS / "prefix_cache.json", help="where the JSON goes"),
) -> None:
    """Runs both configurations, prints the table and writes the JSON."""
    import torch

    from worker.checkpoint import make_random_checkpoint

    cfg = {"rounds": rounds, "shape": shape, "max_tokens": max_tokens, "torch_threads": torch_threads}
    n_layer, n_embd = (int(x) for x in shape.split("x"))
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_random_checkpoint(Path(tmp) / "bench.pth", n_layer=n_layer, n_embd=n_embd, seed=0,
                                            dtype=torch.float32)
        proc, url = start_redis(tmp)
        try:
            res = asyncio.run(bench(cfg, checkpoint, url))
        finally:
            proc.terminate()
            proc.wait()
    cache, plain = res["rounds"]["cache"], res["rounds"]["no cache"]
    print(f"{'round':>5} {'prompt':>7} | {'cache: prefilled':>16} {'wall ms':>8} | {'no cache: prefilled':>19} "
          f"{'wall ms':>8}")
    for a, b in zip(cache, plain):
        print(f"{a['round']:>5} {a['prompt_tokens']:>7} | {a['prefilled_tokens']:>16} {a['wall_s'] * 1e3:>8.1f} | "
              f"{b['prefilled_tokens']:>19} {b['wall_s'] * 1e3:>8.1f}")
    res["goals"] = {"last_round_over_first_with_cache": {"value": cache[-1]["wall_s"] / cache[0]["wall_s"],
                                                         "goal": "<= 1.2",
                                                         "baseline": plain[-1]["wall_s"] / plain[0]["wall_s"]}}
    res["config"], res["checkout"], res["machine"] = cfg, checkout(), machine(load_before, started)
    g = res["goals"]["last_round_over_first_with_cache"]
    print(f"round {rounds} / round 1 wall time: {g['value']:.2f} with the cache (goal {g['goal']}), "
          f"{g['baseline']:.2f} without")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
