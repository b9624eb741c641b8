"""Prefill through the front: time to first token of 32 turns sent together, and the streams' inter-token latency,
with the worker's prefill settings of today against the one-chunk-per-step behaviour, on real processes.

bench/bench_prefill.py measures the engine alone; this is the same question as a client sees it (issue 13's first
measurement was made this way): each configuration is a stack of its own (redis-server, one worker, a front:
`service.stack.Stack`, as `rwkv-stack` starts them) on the same random checkpoint, and an SDK client sends chat
turns as `chat()` does (bench/service_procs.front_turn). Turns through the front do not reach the engine together:
each opens a stream, the front routes it, the worker leases the session in Redis and loads its state; so a burst
arrives at the engine spread over several of its steps, which the engine-only benchmark does not show.

Configurations, interleaved over rounds (ABBA): "one chunk per step" (`RWKV_WORKER_PREFILL_TOKEN_BUDGET=0`, no
pacing: the behaviour before issue 13, the baseline), "fixed budget" (128 tokens, no pacing), "paced, no burst
credit" (the pacer without its budget for spread bursts, `RWKV_WORKER_PREFILL_BURST_STREAMS=0`), "paced, no
gathering" (a burst still arriving is not held back to be prefilled in one step, `RWKV_WORKER_PREFILL_GATHER_MS=0`:
session 7's pacer) and "paced" (the worker's defaults); --skip leaves some out. Each round: `--lone` turns one
after another (a lone turn's TTFT), then a burst of `--concurrency` turns sent at once, then the same number sent
`--gap-ms` apart. Every turn: the service benchmark's
prompt on a `raw` session, greedy, end of text banned so each reply runs to `--max-tokens`. Percentiles pool every
sample of every round. Each worker writes its step trace (`RWKV_WORKER_STEP_TRACE`), so the table also says what
the engine saw: how long a pattern's turns took to reach it, how many the first prefill step caught, and the
steps that ran a decode lane and prefill together (per round, and the slowest). The JSON keeps every step.
Usage: `python -m bench.bench_front_prefill [--rounds 3] [--shape 6x384]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from bench.bench_prefill import latency, samples, skip_configs
from bench.service_common import MODEL_ID, RESULTS, banned_ids, checkout, machine
from bench.service_procs import Service, front_turn

# label -> worker settings (environment); the first is the baseline, the last the default.
CONFIGS: dict[str, dict[str, str]] = {
    "one chunk per step": {"RWKV_WORKER_PREFILL_TOKEN_BUDGET": "0", "RWKV_WORKER_PREFILL_PACING": "false"},
    "fixed budget": {"RWKV_WORKER_PREFILL_PACING": "false"},
    "paced, no burst credit": {"RWKV_WORKER_PREFILL_BURST_STREAMS": "0"},
    "paced, no gathering": {"RWKV_WORKER_PREFILL_GATHER_MS": "0"},  # session 7's pacer: a burst is not gathered
    "paced": {},
}


async def timed_turn(service: Service, sid: str, max_tokens: int, banned: list[int], delay_s: float) -> tuple:
    if delay_s:
        await asyncio.sleep(delay_s)
    t0, times, _, generated = await front_turn(service.client, sid, max_tokens, banned)
    assert generated == max_tokens == len(times), (generated, max_tokens, len(times))
    return t0, times


def read_steps(trace: Path, offset: int) -> list[dict]:
    """The worker's step records (RWKV_WORKER_STEP_TRACE, one JSON line per engine step) written after `offset`."""
    with trace.open("rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines()]


def steps_summary(rounds: list[dict], name: str) -> dict:
    """What the engine saw of an arrival pattern: how long the turns took to reach it (first to last submit), how
    many the first step with prefill caught, and the steps that ran a lane and prefill together."""
    spreads, first, mixed = [], [], []
    for r in rounds:
        steps = r[name]["steps"]
        arrivals = [t for s in steps for t in s["arrivals"]]
        spreads.append((max(arrivals) - min(arrivals)) * 1e3 if arrivals else 0.0)
        first.append(next((s["prefill_turns"] for s in steps if s["prefill_turns"]), 0))
        mixed.append([s for s in steps if s["lane"] and s["prefill_tokens"]])
    flat = [s for m in mixed for s in m]
    return {"arrival_spread_ms": statistics.median(spreads), "first_step_turns": statistics.median(first),
            "mixed_steps_per_round": len(flat) / len(rounds),
            "mixed_step_max_ms": max((s["seconds"] for s in flat), default=0.0) * 1e3}


async def measure(service: Service, sids: list[str], cfg: dict, banned: list[int], trace: Path) -> dict:
    """One round on one stack: lone turns, a burst, staggered arrivals (and the engine steps of the last two)."""
    lone = []
    for _ in range(cfg["lone"]):
        t0, times = await timed_turn(service, sids[0], cfg["max_tokens"], banned, 0.0)
        lone.append(times[0] - t0)
    out: dict[str, Any] = {"lone_ttft_s": lone}
    for name, gap in (("burst", 0.0), ("staggered", cfg["gap_ms"] / 1e3)):
        offset = trace.stat().st_size if trace.exists() else 0
        runs = await asyncio.gather(*(timed_turn(service, sid, cfg["max_tokens"], banned, i * gap)
                                      for i, sid in enumerate(sids)))
        out[name] = {**samples(runs), "steps": read_steps(trace, offset)}
    return out


def summarize(rounds: list[dict]) -> dict:
    lone = statistics.median(x for r in rounds for x in r["lone_ttft_s"])
    return {"lone_ttft_ms": lone * 1e3,
            **{name: {**latency(rounds, name, lone), **steps_summary(rounds, name)} for name in ("burst", "staggered")}}


async def bench(cfg: dict, checkpoint: Path) -> dict:
    def log(text: str) -> None:
        print(f"[bench_front_prefill {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    traces = {label: checkpoint.with_name(f"steps-{i}.jsonl") for i, label in enumerate(CONFIGS)}
    services = {label: Service(checkpoint, cfg["concurrency"], cfg["torch_threads"],
                               {**env, "RWKV_WORKER_STEP_TRACE": str(traces[label])})
                for label, env in CONFIGS.items()}
    raw: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    try:
        sids: dict[str, list[str]] = {}
        for label, service in services.items():
            log(f"starting {label}")
            await service.start()
            sids[label] = [await service.new_session() for _ in range(cfg["concurrency"])]
        info = next(m for m in await services["paced"].client.list_models() if m.id == MODEL_ID)
        banned = banned_ids(info.vocab_size)
        for label, service in services.items():  # warm-up: every session's first turn, every batch size once
            await measure(service, sids[label], {**cfg, "lone": 1}, banned, traces[label])
        for r in range(cfg["rounds"]):
            order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]  # ABBA
            for label in order:
                raw[label].append(await measure(services[label], sids[label], cfg, banned, traces[label]))
                log(f"round {r + 1}/{cfg['rounds']} {label} done")
    finally:
        for service in services.values():
            await service.stop()
    return {"raw": raw, "model": {"n_layer": info.n_layer, "n_embd": info.n_embd}}


def print_report(cfg: dict, res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = res["model"]
    t = Table(title=f"{cfg['concurrency']} chat turns through the front, {cfg['max_tokens']} tokens each, "
                    f"L{m['n_layer']} D{m['n_embd']} fp32; ms, {cfg['rounds']} interleaved rounds pooled")
    for col in ("prefill", "lone TTFT", "arrival", "TTFT p50", "TTFT p90", "p90 / lone", "per round",
                "ITL p50", "ITL p99", "ITL p99 per round", "arrivals over", "first step", "mixed steps", "their max"):
        t.add_column(col, justify="right")
    for label, s in res["summary"].items():
        for name in ("burst", "staggered"):
            v = s[name]
            arrival = "at once" if name == "burst" else f"every {cfg['gap_ms']:g} ms"
            t.add_row(label, f"{s['lone_ttft_ms']:.1f}", arrival,
                      f"{v['ttft_p50_ms']:.0f}", f"{v['ttft_p90_ms']:.0f}", f"{v['ttft_p90_over_lone']:.1f}x",
                      " / ".join(f"{x:.1f}" for x in v["ttft_p90_over_lone_per_round"]), f"{v['itl_p50_ms']:.1f}",
                      f"{v['itl_p99_ms']:.1f}", " / ".join(f"{x:.0f}" for x in v["itl_p99_ms_per_round"]),
                      f"{v['arrival_spread_ms']:.0f} ms", f"{v['first_step_turns']:g}",
                      f"{v['mixed_steps_per_round']:.0f}", f"{v['mixed_step_max_ms']:.0f}")
    Console().print(t)


def main(
    shape: str = typer.Option("6x384", help="random model, LAYERSxWIDTH"),
    rounds: int = typer.Option(3, help="interleaved rounds per configuration"),
    concurrency: int = typer.Option(32, help="turns per burst, and the worker's max batch"),
    max_tokens: int = typer.Option(32, help="tokens generated per turn"),
    gap_ms: float = typer.Option(10.0, help="time between arrivals in the staggered run"),
    lone: int = typer.Option(5, help="lone turns per round"),
    torch_threads: int = typer.Option(0, help="the worker's intra-op threads; 0 = torch's default"),
    skip: list[str] = typer.Option([], help="a configuration to leave out (repeatable; not the first or the last)"),
    out: Path = typer.Option(RESULTS / "front_prefill.json", help="where the JSON goes"),
) -> None:
    """Runs the configurations, prints the table and writes the JSON."""
    skip_configs(CONFIGS, skip)
    import torch

    from worker.checkpoint import make_random_checkpoint

    cfg = {"shape": shape, "rounds": rounds, "concurrency": concurrency, "max_tokens": max_tokens, "gap_ms": gap_ms,
           "lone": lone, "torch_threads": torch_threads, "configs": CONFIGS}
    n_layer, n_embd = (int(x) for x in shape.split("x"))
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_random_checkpoint(Path(tmp) / "bench.pth", n_layer=n_layer, n_embd=n_embd, seed=0,
                                            dtype=torch.float32)
        res = asyncio.run(bench(cfg, checkpoint))
    raw = res.pop("raw")
    res["summary"] = {label: summarize(runs) for label, runs in raw.items()}
    # every engine step of every round (small: a few hundred records per configuration)
    res["steps"] = {label: [{name: r[name]["steps"] for name in ("burst", "staggered")} for r in runs]
                    for label, runs in raw.items()}
    base, new = res["summary"]["one chunk per step"], res["summary"]["paced"]
    res["goals"] = {
        "burst_ttft_p90_over_lone": {"value": new["burst"]["ttft_p90_over_lone"], "goal": "<= 8",
                                     "baseline": base["burst"]["ttft_p90_over_lone"]},
        "burst_itl_p99_over_baseline": {"value": new["burst"]["itl_p99_ms"] / base["burst"]["itl_p99_ms"],
                                        "goal": "<= 1.1"},
        "staggered_itl_p99_over_baseline": {"value": new["staggered"]["itl_p99_ms"] / base["staggered"]["itl_p99_ms"],
                                            "goal": "<= 1.1"},
        "staggered_ttft_p90_over_lone": {"value": new["staggered"]["ttft_p90_over_lone"],
                                         "baseline": base["staggered"]["ttft_p90_over_lone"]},
    }
    res["config"], res["checkout"], res["machine"] = cfg, checkout(), machine(load_before, started)
    print_report(cfg, res)
    for key, g in res["goals"].items():
        print(f"{key}: {g['value']:.2f}" + (f" (goal {g['goal']})" if "goal" in g else "")
              + (f", baseline {g['baseline']:.2f}" if "baseline" in g else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
