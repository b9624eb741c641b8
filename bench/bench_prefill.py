"""Prefill benchmark: time to first token when many turns arrive at once, and what it costs the running streams.

The engine is driven directly, in this process (its async loop and engine thread, as a worker runs it; no front,
Redis or gRPC), so the numbers are the engine's own and a run takes two minutes on two cores. Configurations of
the same engine and model, interleaved over rounds (ABBA): `prefill_token_budget=0` (the old one-chunk-per-step
behaviour, the baseline), the fixed token budget alone (`prefill_cost_slack=None`, chunks grouped up to 128
tokens beside a decode lane), the pacer without its burst credit (`prefill_burst_streams=0`), the pacer as session 5
left it, the pacer without gathering a burst still arriving (`prefill_gather_ms=0`, session 7's) and the default
(that budget plus the cost pacer, its burst credit and gathering, worker/engine/pacing.py); more with --budgets /
--slacks, fewer with --skip. Each round measures
  1. a lone turn's time to first token (the engine idle);
  2. a burst: 32 turns submitted together (time to first token of each, inter-token latency of the streams);
  3. staggered: 32 turns, one every `--gap-ms`, so most prefills run beside a decode lane (the budget binds):
     time to first token, and the inter-token latency of the streams already decoding.
Every turn: the service benchmark's prompt (raw, ~20 tokens), greedy, end of text banned so each reply runs to
max_tokens, a fresh state. Latency percentiles pool every sample of every round. Every engine step is timed too
(wall time of step_sync, lane rows, prefill tokens): the steps that ran a lane and prefill are what sets ITL p99.
Usage: `python -m bench.bench_prefill [--rounds 3] [--shape 6x384] [--budgets 64] [--slacks 0.25]`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import typer

from bench.service_common import PROMPT, RESULTS, banned_ids, checkout, machine, pct

# label -> Engine keyword arguments ({} = the engine's defaults); the first is the baseline, the last the default.
CONFIGS: dict[str, dict[str, Any]] = {
    "one chunk per step": {"prefill_token_budget": 0, "prefill_cost_slack": None},
    "fixed budget": {"prefill_cost_slack": None},
    "paced, no burst credit": {"prefill_burst_streams": 0},
    "paced, session 5 rules": {},  # the engine's defaults with the pacer of session5_pacer()
    "paced, no gathering": {"prefill_gather_ms": 0},  # the pacer of session 7: a burst is not gathered
    "paced": {},
}


def session5_pacer(pacer: Any) -> Any:
    """The pacer as session 5 left it, the baseline of session 7's three changes: its predictor (proportional from
    the point below, capped by the point above), no allowance for the lane the waiting turns will grow, no refill
    of the burst credit when no stream decodes. Same slack, credit and share as `pacer`."""
    from worker.engine.pacing import CostCurve, PrefillPacer

    class Proportional(CostCurve):
        def predict(self, size: int) -> float | None:
            if not self.points or size <= 0:
                return None if not self.points else 0.0
            pts = sorted(self.points.values())
            below, above = [p for p in pts if p[0] <= size], [p for p in pts if p[0] > size]
            x0, y0 = below[-1] if below else pts[0]
            return min(y0 * size / x0, above[0][1]) if below and above else y0 * size / x0

    class Session5(PrefillPacer):
        def observe(self, lane_rows: int, decode_s: float, groups: list[tuple[int, float]]) -> None:
            credit = self.credit
            super().observe(lane_rows, decode_s, groups)
            if not lane_rows:
                self.credit = credit

        def allowance(self, lane_rows: int, first_tokens: int, waiting: int = 1) -> float:
            return super().allowance(lane_rows, first_tokens, 1)

    return Session5(pacer.slack, pacer.burst_streams, pacer.burst_share, Proportional(), Proportional())


def skip_configs(configs: dict[str, Any], skip: list[str]) -> None:
    """Leaves the labelled configurations out (--skip); never the first (the baseline) or the last (the default)."""
    for label in skip:
        if label not in list(configs)[1:-1]:
            raise typer.BadParameter(f"no configuration {label!r} to skip (choose from {list(configs)[1:-1]})")
        del configs[label]


async def one_turn(engine: Any, tokens: list[int], params: Any, delay_s: float = 0.0) -> tuple[float, list[float]]:
    """Submits one turn after `delay_s`; its submit time and the time of each token-bearing delta."""
    from worker.engine import Delta, Finished, TurnRequest

    if delay_s:
        await asyncio.sleep(delay_s)
    t0 = time.perf_counter()
    times: list[float] = []
    async for event in engine.submit(TurnRequest(tokens, params)):
        if isinstance(event, Delta) and event.token_ids:
            times.append(time.perf_counter())
        elif isinstance(event, Finished):
            break
    return t0, times


def time_steps(engine: Any) -> list[tuple[int, int, float]]:
    """Wraps the engine's step_sync to record (lane rows, prefill tokens, seconds) of every step it runs."""
    steps: list[tuple[int, int, float]] = []
    scheduler, runner = engine.scheduler, engine.batch_runner

    def step_sync() -> list:
        started = time.perf_counter()
        step = scheduler.schedule()
        result = runner.run(step)
        out = scheduler.postprocess(step, result)
        if not step.empty:  # (a burst being gathered: the engine sleeps, nothing ran)
            steps.append((len(step.decode), step.prefill_tokens, time.perf_counter() - started))
        return out

    engine.step_sync = step_sync
    return steps


def samples(runs: list[tuple[float, list[float]]]) -> dict[str, list[float]]:
    """(submit time, token times) of each turn -> its time to first token, and the gaps between its tokens."""
    return {"ttft_s": [times[0] - t0 for t0, times in runs],
            "itl_s": [b - a for _, times in runs for a, b in zip(times, times[1:])]}


async def measure(engine: Any, tokens: list[int], params: Any, n: int, gap_s: float, lone: int) -> dict:
    lone_ttft = []
    for _ in range(lone):
        t0, times = await one_turn(engine, tokens, params)
        lone_ttft.append(times[0] - t0)
    out: dict[str, Any] = {"lone_ttft_s": lone_ttft}
    for name, gap in (("burst", 0.0), ("staggered", gap_s)):
        engine.steps.clear()
        runs = await asyncio.gather(*(one_turn(engine, tokens, params, i * gap) for i in range(n)))
        out[name] = {**samples(runs), "generated": sum(len(times) for _, times in runs), "steps": list(engine.steps)}
    return out


def latency(rounds: list[dict], name: str, lone: float) -> dict:
    """TTFT and ITL percentiles of one arrival pattern, pooled over the rounds, and per round (what pooling hides)."""
    ttft = [x for r in rounds for x in r[name]["ttft_s"]]
    itl = [x for r in rounds for x in r[name]["itl_s"]]
    return {"ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p90_ms": pct(ttft, 90) * 1e3,
            "ttft_p90_over_lone": pct(ttft, 90) / lone, "itl_p50_ms": pct(itl, 50) * 1e3,
            "itl_p99_ms": pct(itl, 99) * 1e3, "samples_ttft_itl": [len(ttft), len(itl)],
            "ttft_p90_over_lone_per_round": [pct(r[name]["ttft_s"], 90) / lone for r in rounds],
            "itl_p99_ms_per_round": [pct(r[name]["itl_s"], 99) * 1e3 for r in rounds]}


def summarize(rounds: list[dict]) -> dict:
    lone = statistics.median(x for r in rounds for x in r["lone_ttft_s"])
    out: dict[str, Any] = {"lone_ttft_ms": lone * 1e3}
    for name in ("burst", "staggered"):
        steps = [s for r in rounds for s in r[name]["steps"]]
        mixed = [s for s in steps if s[0] and s[1]]  # a lane and prefill in one step
        out[name] = {**latency(rounds, name, lone),
                     "steps_per_round": len(steps) / len(rounds), "mixed_steps_per_round": len(mixed) / len(rounds),
                     "mixed_prefill_tokens_mean": statistics.fmean(s[1] for s in mixed) if mixed else 0.0,
                     "mixed_step_max_ms": max((s[2] for s in mixed), default=0.0) * 1e3,
                     "mixed_step_p50_ms": pct([s[2] for s in mixed], 50) * 1e3 if mixed else 0.0}
    return out


async def bench(cfg: dict, checkpoint: Path) -> dict:
    import torch

    from common.lifecycle import freeze_startup_heap
    from worker.engine import Engine
    from worker.model import RWKV5
    from worker.sampler import SamplingParams
    from worker.tokenizer import load_tokenizer

    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    model = RWKV5.from_checkpoint(checkpoint, dtype=torch.float32)
    tokenizer = load_tokenizer(None)
    tokens = tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=cfg["max_tokens"], temperature=0.0,
                            banned_tokens=tuple(banned_ids(model.config.vocab_size)))
    engines = {}
    for label, kwargs in CONFIGS.items():
        engines[label] = Engine(model, tokenizer, max_batch=cfg["concurrency"], max_queued=64, **kwargs)
        if "session 5" in label:
            engines[label].scheduler.pacer = session5_pacer(engines[label].scheduler.pacer)
        engines[label].steps = time_steps(engines[label])
        engines[label].start()
    raw: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    freeze_startup_heap()  # as a worker does once it is up (common/lifecycle.py): no ~130 ms full collections
    try:
        for engine in engines.values():  # warm-up: every batch size once
            await measure(engine, tokens, params, cfg["concurrency"], 0.0, 1)
        for r in range(cfg["rounds"]):
            order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]  # ABBA
            for label in order:
                raw[label].append(await measure(engines[label], tokens, params, cfg["concurrency"],
                                                cfg["gap_ms"] / 1e3, cfg["lone"]))
                print(f"[bench_prefill] round {r + 1}/{cfg['rounds']} {label} done", file=sys.stderr, flush=True)
    finally:
        for engine in engines.values():
            await engine.close()
    budgets = {label: engines[label].prefill_token_budget for label in CONFIGS}
    pacers = {label: {"decode_rows_s": sorted(p.decode.points.values()),
                      "prefill_tokens_s": sorted(p.prefill.points.values())}
              for label in CONFIGS if (p := engines[label].scheduler.pacer) is not None}  # what each pacer learned
    slacks = {label: engines[label].prefill_cost_slack for label in CONFIGS}
    return {"raw": raw, "prompt_tokens": len(tokens), "budgets": budgets, "slacks": slacks, "pacers": pacers,
            "model": {"n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "kernel": model.kernel}}


def print_report(cfg: dict, res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = res["model"]
    t = Table(title=f"{cfg['concurrency']} turns of {res['prompt_tokens']} prompt tokens + {cfg['max_tokens']} "
                    f"generated, L{m['n_layer']} D{m['n_embd']} fp32 ({m['kernel']}), engine direct; ms, "
                    f"{cfg['rounds']} interleaved rounds pooled")
    for col in ("prefill", "budget", "slack", "lone TTFT", "arrival", "TTFT p50", "TTFT p90", "p90 / lone",
                "ITL p50", "ITL p99", "mixed steps", "their tokens", "their max"):
        t.add_column(col, justify="right")
    for label, s in res["summary"].items():
        for name in ("burst", "staggered"):
            v = s[name]
            arrival = "at once" if name == "burst" else f"every {cfg['gap_ms']:g} ms"
            slack = res["slacks"][label]
            t.add_row(label, str(res["budgets"][label]), "-" if slack is None else f"{slack:g}",
                      f"{s['lone_ttft_ms']:.1f}", arrival, f"{v['ttft_p50_ms']:.0f}", f"{v['ttft_p90_ms']:.0f}",
                      f"{v['ttft_p90_over_lone']:.1f}x", f"{v['itl_p50_ms']:.1f}", f"{v['itl_p99_ms']:.1f}",
                      f"{v['mixed_steps_per_round']:.0f}", f"{v['mixed_prefill_tokens_mean']:.0f}",
                      f"{v['mixed_step_max_ms']:.0f}")
    Console().print(t)


def main(
    shape: str = typer.Option("6x384", help="random model, LAYERSxWIDTH"),
    rounds: int = typer.Option(3, help="interleaved rounds per configuration"),
    concurrency: int = typer.Option(32, help="turns per burst, and the engine's max_batch"),
    max_tokens: int = typer.Option(32, help="tokens generated per turn"),
    gap_ms: float = typer.Option(10.0, help="time between arrivals in the staggered run"),
    lone: int = typer.Option(5, help="lone turns per round"),
    torch_threads: int = typer.Option(0, help="intra-op threads; 0 = torch's default"),
    budgets: str = typer.Option("", help="extra fixed budgets (no pacer) to compare, e.g. 64,256"),
    slacks: str = typer.Option("", help="extra pacer slacks (default budget) to compare, e.g. 0.25,0.5"),
    skip: list[str] = typer.Option([], help="a configuration to leave out (repeatable; not the first or the last)"),
    out: Path = typer.Option(RESULTS / "prefill.json", help="where the JSON goes"),
) -> None:
    """Runs the configurations, prints the table and writes the JSON."""
    skip_configs(CONFIGS, skip)
    default = CONFIGS.pop("paced")
    for b in filter(None, budgets.split(",")):
        CONFIGS[f"fixed budget {int(b)}"] = {"prefill_token_budget": int(b), "prefill_cost_slack": None}
    for x in filter(None, slacks.split(",")):
        CONFIGS[f"paced, slack {float(x):g}"] = {"prefill_cost_slack": float(x)}
    CONFIGS["paced"] = default
    from worker.checkpoint import make_random_checkpoint

    cfg = {"shape": shape, "rounds": rounds, "concurrency": concurrency, "max_tokens": max_tokens, "gap_ms": gap_ms,
           "lone": lone, "torch_threads": torch_threads}
    n_layer, n_embd = (int(x) for x in shape.split("x"))
    load_before, started = os.getloadavg(), time.perf_counter()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        import torch

        checkpoint = make_random_checkpoint(Path(tmp) / "bench.pth", n_layer=n_layer, n_embd=n_embd, seed=0,
                                            dtype=torch.float32)
        res = asyncio.run(bench(cfg, checkpoint))
    res["summary"] = {label: summarize(runs) for label, runs in res["raw"].items()}
    base, new = res["summary"]["one chunk per step"], res["summary"]["paced"]
    res["goals"] = {
        "burst_ttft_p90_over_lone": {"value": new["burst"]["ttft_p90_over_lone"], "goal": "<= 8",
                                     "baseline": base["burst"]["ttft_p90_over_lone"]},
        "staggered_ttft_p90_over_lone": {"value": new["staggered"]["ttft_p90_over_lone"],
                                         "baseline": base["staggered"]["ttft_p90_over_lone"]},
        "burst_itl_p99_over_baseline": {"value": new["burst"]["itl_p99_ms"] / base["burst"]["itl_p99_ms"],
                                        "goal": "<= 1.1"},
        "staggered_itl_p99_over_baseline": {"value": new["staggered"]["itl_p99_ms"] / base["staggered"]["itl_p99_ms"],
                                            "goal": "<= 1.1"},
    }
    if (fixed := res["summary"].get("fixed budget")) is not None:
        res["goals"]["fixed_budget_staggered_itl_p99_over_baseline"] = {
            "value": fixed["staggered"]["itl_p99_ms"] / base["staggered"]["itl_p99_ms"], "goal": "<= 1.1"}
        res["goals"]["fixed_budget_burst_ttft_p90_over_lone"] = {"value": fixed["burst"]["ttft_p90_over_lone"],
                                                                  "goal": "<= 8"}
    res["config"], res["checkout"] = cfg, checkout()
    res["machine"] = machine(load_before, started)
    print_report(cfg, res)
    for key, g in res["goals"].items():
        print(f"{key}: {g['value']:.2f}" + (f" (goal {g['goal']})" if "goal" in g else "")
              + (f", baseline {g['baseline']:.2f}" if "baseline" in g else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
