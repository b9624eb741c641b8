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

This module runs the rounds and writes the report; the parts live beside it: bench/service_common.py (constants,
percentiles, CPU time, run metadata), bench/service_procs.py (the engine child, the Redis + worker + front stack),
bench/service_throughput.py (1 and 4), bench/service_turns.py (2), bench/service_store.py (3, `--only store`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from bench.service_common import MODEL_ID, PROMPT, RESULTS, ROOT, STATE_12B, banned_ids, checkout, goal_of, machine
from bench.service_procs import EngineProcess, Service, engine_child
from bench.service_store import print_state_io, state_io, store_only, summarize_state
from bench.service_throughput import print_cpu, print_throughput, summarize_throughput, throughput_round, warm_up
from bench.service_turns import print_turns, summarize_turns, turn_series


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
        await warm_up(engine, service, sids, concurrencies, banned)
        for r in range(cfg["rounds"]):
            await throughput_round(engine, service, sids, cfg, r, banned, out["throughput"], log)
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
    thr, lat, cpu = summarize_throughput(raw["throughput"])
    turns = summarize_turns(cfg, raw["turns"])
    state = summarize_state(raw["state_io"])
    ratios = {f"throughput_front_vs_engine@{c}": v["ratio_paired"] for c, v in thr.items()}
    ratios[f"turn_{cfg['turns']}_vs_turn_1"] = turns["ratio_paired"]
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


def print_report(cfg: dict, summary: dict, model: dict, out: Path) -> None:
    """Every table, then each ratio against its goal."""
    from rich.console import Console

    c = Console(width=150)  # the tables are wide; a pipe would otherwise get 80 columns
    print_throughput(c, cfg, summary, model)
    print_turns(c, cfg, summary["turns"])
    print_state_io(c, summary["state_io"])
    print_cpu(c, summary["cpu_ms_per_token"])
    for key, value in summary["ratios"].items():
        op, goal = goal_of(key)
        ok = value >= goal if op == ">=" else value <= goal
        c.print(f"{key}: {value:.2f} (goal {op} {goal}) {'[green]met[/green]' if ok else '[red]missed[/red]'}")
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
        "machine": machine(load_before, started),
        "summary": summary,
        "raw": compact(raw),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(cfg, summary, raw["model"], out)


if __name__ == "__main__":
    typer.run(main)
