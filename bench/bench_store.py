"""The store at scale: a turn's save + load through the store vs raw SET + GET, on one node and on a 6-node Redis
Cluster (3 masters, 3 replicas), at the 12B and L12 D768 state sizes; and what WAIT 1 adds to a commit.

    python -m bench.bench_store [--reps-12b 7] [--reps-model 41] [--out bench/results/store.json]

Every topology is real redis-server processes on loopback, started by this run (tests/redis_topologies.py), so the
ratios compare like with like in one run. Medians of interleaved repetitions (bench/service_store.py: state_io).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from bench.service_common import GOALS, STATE_12B, checkout, machine
from bench.service_store import print_state_io, state_io, summarize_state

MODEL_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "head_size": 64}


async def _sizes(store: Any, reps_12b: int, reps_model: int) -> dict:
    return {"12B": await state_io(store, STATE_12B, reps_12b),
            "L12 D768": await state_io(store, MODEL_SHAPE, reps_model)}


async def _wait_cost(url: str, reps: int) -> dict:
    """commit_and_release + begin_turn at the L12 D768 size with WAIT 1 vs without, same master + replica."""
    from common.store import StateStore

    out: dict[str, Any] = {}
    for name, replicas in (("wait 0", 0), ("wait 1", 1)):
        store = StateStore.from_url(url)
        store.wait_replicas, store.wait_timeout_ms = replicas, 5_000
        try:
            res = await state_io(store, MODEL_SHAPE, reps)
        finally:
            await store.close()
        out[name] = {"commit_ms": res["median_s"]["commit"] * 1e3, "begin_ms": res["median_s"]["begin"] * 1e3}
    out["added_commit_ms"] = out["wait 1"]["commit_ms"] - out["wait 0"]["commit_ms"]
    return out


async def run(reps_12b: int, reps_model: int) -> dict:
    from common.store import StateStore
    from tests.redis_topologies import start_cluster, start_redis

    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            master = start_redis(Path(tmp) / "master", 24000)
            replica = start_redis(Path(tmp) / "replica", 24001, "--replicaof", "127.0.0.1", "24000")
            cluster = start_cluster(Path(tmp) / "cluster")
        try:
            for name, url in (("single node", "redis://127.0.0.1:24000/0"), ("cluster", cluster.url)):
                store = StateStore.from_url(url)
                try:
                    raw[name] = await _sizes(store, reps_12b, reps_model)
                finally:
                    await store.close()
                print(f"[bench_store] {name}: done", file=sys.stderr, flush=True)
            raw["wait"] = await _wait_cost("redis://127.0.0.1:24000/0", reps_model)
        finally:
            cluster.stop()
            replica.kill()
            master.kill()
    return raw


def main(reps_12b: int = typer.Option(7, help="repetitions at the 12B size"),
         reps_model: int = typer.Option(41, help="repetitions at the L12 D768 size"),
         out: Path = typer.Option(Path("bench/results/store.json"), help="JSON output")) -> None:
    from rich.console import Console

    started, load_before = time.perf_counter(), os.getloadavg()
    raw = asyncio.run(run(reps_12b, reps_model))
    summary = {name: summarize_state(raw[name]) for name in ("single node", "cluster")}
    ratios = {f"store_vs_raw@{topology}@{size}": v["ratio"] for topology, sizes in summary.items()
              for size, v in sizes.items()}
    report = {"summary": {"state_io": summary, "ratios": ratios, "wait": raw["wait"], "goal": GOALS["state_io"]},
              "raw": {name: {size: {k: v for k, v in res.items() if k != "samples_s"}
                             for size, res in raw[name].items()} for name in ("single node", "cluster")},
              "config": {"reps_12b": reps_12b, "reps_model": reps_model},
              "code": checkout(), "machine": machine(load_before, started)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    c = Console(width=150)
    for topology, sizes in summary.items():
        c.print(f"[bold]{topology}[/bold]")
        print_state_io(c, sizes)
    for name, ratio in ratios.items():
        c.print(f"{name}: {ratio:.2f} (goal <= {GOALS['state_io']}) "
                f"{'[green]met[/green]' if ratio <= GOALS['state_io'] else '[red]missed[/red]'}")
    wait = raw["wait"]
    c.print(f"WAIT 1 (master + 1 replica, L12 D768 record): commit {wait['wait 0']['commit_ms']:.2f} -> "
            f"{wait['wait 1']['commit_ms']:.2f} ms (+{wait['added_commit_ms']:.2f} ms)")
    c.print(f"JSON: {out}")


if __name__ == "__main__":
    typer.run(main)
