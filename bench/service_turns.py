"""Turn 100 vs turn 1 of the service benchmark: one session's latency over a long series, and its Redis size."""

from __future__ import annotations

import statistics
from typing import Any

from bench.service_procs import Service, front_turn


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


def summarize_turns(cfg: dict, series: list[dict]) -> dict:
    """Medians over rounds of the series: turn 1 and turn n, the paired ratio, the slope, TTFT, Redis bytes."""
    n, k = cfg["turns"], cfg["paired"]
    pairs = [late / first for s in series for first, late in zip(s["fresh_turn_1_s"], s["latency_s"][-k:])]

    def slope(ys: list[float]) -> float:  # least squares, seconds per turn
        xs = range(1, len(ys) + 1)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    return {
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


def print_turns(c: Any, cfg: dict, tu: dict) -> None:
    """The one-session series table."""
    from rich.table import Table

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
