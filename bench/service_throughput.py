"""Throughput and latency of the service benchmark: front + worker vs the engine direct, at each concurrency."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from bench.service_common import GOALS, pct
from bench.service_procs import EngineProcess, Service


async def warm_up(engine: EngineProcess, service: Service, sids: list[str], concurrencies: list[int],
                  banned: list[int]) -> None:
    """Each session's first turn; every batch size once on both sides."""
    for c in concurrencies:
        await engine.run(c, 4, banned)
        await service.run(sids[:c], 4, banned)


async def throughput_round(engine: EngineProcess, service: Service, sids: list[str], cfg: dict, r: int,
                           banned: list[int], results: dict, log: Callable[[str], None]) -> None:
    """Round `r`: every concurrency (alternating order between rounds) on both sides (ABBA order), each run
    appended to results[str(concurrency)][side]."""
    concurrencies: list[int] = cfg["concurrency"]
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
            results[str(c)][side].append(res)
            log(f"round {r + 1}/{cfg['rounds']} concurrency {c} {side}: {res['tok_s']:.1f} tok/s")


def summarize_throughput(raw_throughput: dict) -> tuple[dict, dict, dict]:
    """Median tok/s and ratios, pooled TTFT/ITL percentiles, and CPU ms per token, by concurrency and side."""
    thr, lat, cpu = {}, {}, {}
    for c, sides in raw_throughput.items():
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
    return thr, lat, cpu


def print_throughput(c: Any, cfg: dict, summary: dict, model: dict) -> None:
    """The tok/s table and the TTFT/ITL table."""
    from rich.table import Table

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


def print_cpu(c: Any, cpu_ms_per_token: dict) -> None:
    """The CPU ms per generated token table, by process."""
    from rich.table import Table

    t = Table(title="CPU ms per generated token, by process (medians)")
    procs = ["engine", "worker", "front", "client", "redis"]
    t.add_column("run", justify="right")
    for p in procs:
        t.add_column(p, justify="right")
    for run, v in cpu_ms_per_token.items():
        t.add_row(run, *(f"{v[p]:.2f}" if p in v else "-" for p in procs))
    c.print(t)
