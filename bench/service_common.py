"""Shared pieces of the service benchmark: constants, banned ids, percentiles, CPU time, run summary, run metadata."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL_ID = "bench"
# The 12B RWKV-5 World shape: 32 layers, 5120 wide, 80 heads of 64 -> 43,253,760 state bytes per session.
STATE_12B = {"n_layer": 32, "n_embd": 5120, "n_head": 80, "head_size": 64}
PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches from the old stone wall."
GOALS = {"throughput": 0.9, "turn_latency": 1.1, "state_io": 1.2}


def banned_ids(model_vocab: int) -> list[int]:
    """What greedy replies must never pick so that they run to max_tokens: token 0 (end of text), and the head's
    ids past the tokenizer's vocab (65530..65535 in World models), which a random model does pick and the
    tokenizer cannot decode (see docs/benchmarks.md)."""
    from worker.tokenizer import load_tokenizer

    return [0, *range(load_tokenizer(None).vocab_size, model_vocab)]


def checkout() -> dict:
    """The commit the benchmark ran on, and whether tracked files had local changes (None outside a checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain", "-uno").strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def machine(load_before: tuple[float, float, float], started: float) -> dict:
    """The machine a run ran on: CPU, core count, load average before and after, and the run's duration."""
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "duration_s": time.perf_counter() - started}


def cpu_model() -> dict:
    """The CPU's model name and the vector extensions the kernels care about, from /proc/cpuinfo ({} elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model_name": info.get("model name", ""), "flags": [f for f in wanted if f in flags]}


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_summary(t0s: list[float], token_times: list[list[float]], ends: list[float], generated: int) -> dict:
    """Aggregate tok/s, TTFT and ITL samples of one concurrent run (times in perf_counter seconds)."""
    wall = max(ends) - min(t0s)
    ttft = [times[0] - t0 for t0, times in zip(t0s, token_times) if times]
    itl = [b - a for times in token_times for a, b in zip(times, times[1:])]
    return {"wall_s": wall, "generated": generated, "tok_s": generated / wall, "ttft_s": ttft, "itl_s": itl}


def goal_of(key: str) -> tuple[str, float]:
    """The comparison and goal a key of the summary's ratios is checked against."""
    if key.startswith("throughput"):
        return ">=", GOALS["throughput"]
    if key.startswith("turn"):
        return "<=", GOALS["turn_latency"]
    return "<=", GOALS["state_io"]
