"""State save + load of the service benchmark: a worker turn's store calls vs raw SET + GET; `--only store`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.service_common import GOALS, MODEL_ID, STATE_12B, checkout, machine


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


def summarize_state(raw_state_io: dict) -> dict:
    """Per state size: record bytes, median ms of each step, store/raw ratio, raw GB/s."""
    state = {}
    for name, res in raw_state_io.items():
        med = res["median_s"]
        state[name] = {"record_bytes": res["record_bytes"], "state_bytes": res["state_bytes"],
                       **{f"{k}_ms": v * 1e3 for k, v in med.items()}, "ratio": med["store"] / med["raw"],
                       "raw_gb_s": 2 * res["record_bytes"] / med["raw"] / 1e9}
    return state


def print_state_io(c: Any, state_io: dict) -> None:
    """The state save + load table."""
    from rich.table import Table

    t = Table(title="State save + load (ms, medians): a turn's store calls vs raw SET+GET of the same record")
    for col in ("state", "record bytes", "raw SET+GET", "store total", "commit_and_release", "begin_turn",
                "ratio", "to_bytes", "from_bytes"):
        t.add_column(col, justify="right")
    for name, v in state_io.items():
        t.add_row(name, f"{v['record_bytes']:,}", f"{v['raw_ms']:.2f}", f"{v['store_ms']:.2f}", f"{v['commit_ms']:.2f}",
                  f"{v['begin_ms']:.2f}", f"{v['ratio']:.2f}", f"{v['to_bytes_ms']:.2f}", f"{v['from_bytes_ms']:.2f}")
    c.print(t)


async def bench_store(cfg: dict, n_layer: int, n_embd: int) -> dict:
    """Section 3 alone: a redis-server of its own, no model (the state is random; a random checkpoint's heads are
    64 wide, so the model's state shape follows from --shape)."""
    from common.store import StateStore
    from service.stack import EmbeddedRedis

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
        "machine": machine(load_before, started),
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
