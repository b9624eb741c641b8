"""Load test through the front: N sessions talking for T seconds, on real processes over loopback.

Each session is one Chat stream that sends a turn, reads it to turn_end and sends the next, until the time is up.
Reported: time to first token (turn sent -> first delta) and inter-token latency (gap between consecutive deltas,
spread over the tokens a delta carries), p50/p99; turns, tokens and throughput; errors by type; and lost turns: a
turn whose turn_end reported version v must read back as version >= v with a state record that passes its checks
(magic, this model's fingerprint, sizes, checksum). Lost turns must be 0.

Bounded in time and count (at most 600 s and 256 sessions) and loopback only. Starts its own stack (Redis, workers,
front; a random-init tiny model unless --model) unless --target names a running front.

    python -m bench.load_test --sessions 8 --duration 20 [--workers 2] [--max-tokens 32]

Writes a table to stdout and JSON to bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_DURATION_S, MAX_SESSIONS = 600.0, 256


@dataclass
class LoadReport:
    """What one load run measured."""

    sessions: int
    duration_s: float
    max_tokens: int
    turns: int = 0
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # exception type -> count
    lost_turns: int = 0
    reported: dict[str, int] = field(default_factory=dict)  # session -> highest version a turn_end reported
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions, "duration_s": self.duration_s, "max_tokens": self.max_tokens,
            "elapsed_s": round(self.elapsed_s, 3), "turns": self.turns, "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "turns_per_s": round(self.turns / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "ttft_ms": _percentiles(self.ttft_ms), "itl_ms": _percentiles(self.itl_ms),
            "errors": dict(self.errors), "error_count": sum(self.errors.values()), "lost_turns": self.lost_turns,
        }


def _percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(values), "p50": round(statistics.median(ordered), 3), "p99": at(0.99), "max": at(1.0)}


def check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise SystemExit(f"the load test only runs against loopback, not {target!r}")


async def _session_loop(rwkv: Any, model: str, index: int, until: float, max_tokens: int, max_turns: int,
                        report: LoadReport) -> None:
    from rwkv_serve_client import RWKVError, TextDelta, TurnResult

    try:
        session = await rwkv.create_session(model, temperature=1.0, top_p=0.9, max_tokens=max_tokens,
                                            seed=index)
    except RWKVError as exc:
        report.errors[type(exc).__name__] += 1
        return
    sid = session.session_id
    turn = 0
    while time.monotonic() < until and turn < max_turns:
        turn += 1
        try:
            async with rwkv.chat_stream(sid) as stream:
                sent = time.monotonic()
                await stream.send(f"Session {index}, turn {turn}: tell me something.", return_token_ids=True)
                last = None
                async for event in stream.until_turn_end():
                    now = time.monotonic()
                    if isinstance(event, TextDelta) and event.token_ids:
                        if last is None:
                            report.ttft_ms.append((now - sent) * 1000)
                        else:
                            gap = (now - last) * 1000 / len(event.token_ids)
                            report.itl_ms.extend([gap] * len(event.token_ids))
                        last = now
                        report.tokens += len(event.token_ids)
                    elif isinstance(event, TurnResult):
                        report.turns += 1
                        report.reported[sid] = max(report.reported.get(sid, 0), event.state_version)
        except RWKVError as exc:
            report.errors[type(exc).__name__] += 1
            retry = getattr(exc, "retry_after_s", None)
            await asyncio.sleep(min(retry if retry else 0.1, 1.0))


async def _verify(rwkv: Any, report: LoadReport, redis_url: str | None, model: str) -> None:
    """Counts lost turns: every session must read back at the version its last turn_end reported, or later, and
    its stored state must be a sound record of this model."""
    from rwkv_serve_client import RWKVError

    fingerprint = None
    for info in await rwkv.list_models():
        if info.id == model:
            fingerprint = bytes.fromhex(info.fingerprint)
    db = None
    if redis_url is not None:
        import redis.asyncio as aioredis

        db = aioredis.Redis.from_url(redis_url)
    try:
        for sid, version in report.reported.items():
            try:
                stored = (await rwkv.get_session(sid)).state_version
            except RWKVError:
                report.lost_turns += version
                continue
            if stored < version:
                report.lost_turns += version - stored
                continue
            if not await _state_sound(rwkv, db, sid, fingerprint):
                report.lost_turns += version
    finally:
        if db is not None:
            await db.aclose()


async def _state_sound(rwkv: Any, db: Any, sid: str, fingerprint: bytes | None) -> bool:
    from rwkv_serve_client import RWKVError

    if db is not None and fingerprint is not None:
        from worker.state import StateFormatError, state_from_bytes

        family, dot, rest = sid.partition(".")
        data = await db.get(f"rwkv:{{{family}}}{dot}{rest}:state")
        try:
            state_from_bytes(data or b"", fingerprint)
            return True
        except StateFormatError:
            return False
    try:  # no Redis access: the worker loads and checks the state for a read-only turn
        await rwkv.complete("check", session_id=sid, ephemeral=True, max_tokens=1)
        return True
    except RWKVError:
        return False


async def run_load(target: str, *, sessions: int = 8, duration_s: float = 10.0, max_tokens: int = 32,
                   model: str = "tiny", redis_url: str | None = None, max_turns: int = 10_000) -> LoadReport:
    """Runs the load against a front and verifies every reported turn; returns the report."""
    from rwkv_serve_client import AsyncRWKVClient

    check_loopback(target)
    if not 0 < duration_s <= MAX_DURATION_S or not 0 < sessions <= MAX_SESSIONS:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S}] s and sessions in (0, {MAX_SESSIONS}]")
    report = LoadReport(sessions, duration_s, max_tokens)
    async with AsyncRWKVClient(target, timeout=30) as rwkv:
        started = time.monotonic()
        until = started + duration_s
        await asyncio.gather(*(_session_loop(rwkv, model, i, until, max_tokens, max_turns, report)
                               for i in range(sessions)))
        report.elapsed_s = time.monotonic() - started
        await _verify(rwkv, report, redis_url, model)
    return report


def table(summary: dict[str, Any]) -> str:
    ttft, itl = summary["ttft_ms"], summary["itl_ms"]
    rows = [
        ("sessions x duration", f"{summary['sessions']} x {summary['duration_s']:g} s"),
        ("turns / tokens", f"{summary['turns']} / {summary['tokens']}"),
        ("throughput", f"{summary['tokens_per_s']} tok/s, {summary['turns_per_s']} turns/s"),
        ("time to first token", f"p50 {ttft['p50']:.1f} ms, p99 {ttft['p99']:.1f} ms (n={ttft['n']})"),
        ("inter-token latency", f"p50 {itl['p50']:.2f} ms, p99 {itl['p99']:.2f} ms (n={itl['n']})"),
        ("errors", f"{summary['error_count']} {summary['errors'] or ''}".strip()),
        ("lost turns", str(summary["lost_turns"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=32, help="per turn")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the stack this starts")
    parser.add_argument("--model", type=Path, help="RWKV-5 .pth (default: a random-init L2 D128 model)")
    parser.add_argument("--target", help="a running front (loopback) instead of starting a stack")
    parser.add_argument("--redis-url", help="with --target: the stack's Redis, to check the stored states")
    parser.add_argument("--model-id", default="tiny")
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args(argv)

    stack = None
    target, redis_url = args.target, args.redis_url
    if target is None:
        from service.stack import Stack, free_port

        model = args.model
        if model is None:
            from worker.checkpoint import make_random_checkpoint

            model = make_random_checkpoint(Path(tempfile.mkdtemp(prefix="rwkv-load-")) / "tiny.pth", n_layer=2,
                                           n_embd=128, seed=0)
        stack = Stack(port=free_port(), model=model, model_id=args.model_id, redis_url="redis://127.0.0.1:1/0",
                      workers=args.workers, quiet=True, extra_env={"RWKV_WORKER_TORCH_THREADS": "1"})
        stack.start()  # nothing answers at port 1: it starts a private redis-server
        target, redis_url = stack.target, stack.url
    try:
        report = asyncio.run(run_load(target, sessions=args.sessions, duration_s=args.duration,
                                      max_tokens=args.max_tokens, model=args.model_id, redis_url=redis_url))
    finally:
        if stack is not None:
            stack.stop()
    summary = report.summary()
    summary["setup"] = {"workers": args.workers if stack is not None else None, "model": args.model_id,
                        "machine": platform.machine(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(table(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if summary["lost_turns"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
