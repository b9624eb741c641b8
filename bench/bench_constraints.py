"""Structured-output benchmark: decode tok/s of a B=16 batch with a JSON schema on every turn against the same batch
with none, in one run (arms interleaved over rounds), and the one-time compile cost of a typical schema.

The engines run directly (no gRPC), one per arm on one model, stepping in alternation so that a busy machine slows
both alike; each batch is kept full: a turn that finishes is replaced at once by a new one of its arm. Only decode
steps (no prefill chunk in them) are timed, so both arms measure the same work, the lane's
forward + sampling, plus, for the schema arm, the masks (filled in llguidance's threads while the forward runs) and
the matchers' bookkeeping. The model is the random L12 D768 fp32 checkpoint bench_sampler uses (sampling at
temperature 1: a random model wanders through whatever the schema allows).
Usage: `python -m bench.bench_constraints [--rounds 3] [--steps 60] [--device cpu]`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# A typical response schema: required fields, an enum, a bounded array, a nested object, patterns, a longer text.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,10}$"}, "maxItems": 5},
        "author": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 30},
            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
            "required": ["name", "email"], "additionalProperties": False},
        "summary": {"type": "string", "maxLength": 300},
    },
    "required": ["title", "sentiment", "score", "tags", "author", "summary"],
    "additionalProperties": False,
}


def _model(device: str):
    import torch

    from worker.checkpoint import make_random_checkpoint
    from worker.model import RWKV5

    ckpt = ROOT / "bench" / ".cache" / "random-L12-D768-fp32.pth"
    if not ckpt.exists():
        make_random_checkpoint(ckpt, 12, 768, seed=0)
    return RWKV5.from_checkpoint(ckpt, dtype=torch.float32, device=device)


class Arm:
    """One engine whose batch is kept full of turns of one kind (with the schema or without)."""

    def __init__(self, engine, tokenizer, constrained: bool, batch: int, seed: int, top_p: float = 1.0) -> None:
        self.engine, self.constrained, self.batch, self.top_p = engine, constrained, batch, top_p
        self.prompt = tokenizer.encode("User: review this product as JSON\n\nAssistant:")
        self.seeds = iter(range(seed * 100_000, (seed + 1) * 100_000))
        self.times: list[float] = []
        self.tokens = 0
        self.finished = 0
        for _ in range(batch):
            self.submit()

    def submit(self) -> None:
        from worker.engine import TurnRequest
        from worker.sampler import SamplingParams

        fmt = {"json_schema": json.dumps(SCHEMA)} if self.constrained else None
        self.engine.submit(TurnRequest(self.prompt, SamplingParams(
            temperature=1.0, top_p=self.top_p, seed=next(self.seeds), stop_token_ids=(), max_tokens=400,
            response_format=fmt)))

    def step(self) -> None:
        """One engine step (schedule, run, postprocess); timed when it is a pure decode step."""
        from worker.engine import Finished

        sched, runner = self.engine.scheduler, self.engine.batch_runner
        step = sched.schedule()
        t0 = time.perf_counter()
        result = runner.run(step)
        dt = time.perf_counter() - t0
        events = sched.postprocess(step, result)
        if not step.prefill and step.decode:
            self.times.append(dt)
            self.tokens += len(step.sample_rows)
        for _, event in events:
            if isinstance(event, Finished):
                self.finished += 1
                self.submit()

    def close(self) -> dict:
        while not self.engine.idle:  # let the last turns go
            for seq in self.engine.scheduler.running:
                seq.cancelled = True
            self.engine.step_sync()
        return {"tok_s": self.tokens / sum(self.times), "step_ms_median": statistics.median(self.times) * 1e3,
                "turns_completed": self.finished, "decode_steps": len(self.times)}


def decode_round(engines: dict, tokenizer, batch: int, steps: int, seed: int, top_p: float = 1.0) -> dict[str, dict]:
    """Both arms step in alternation (one step each, in turn) until each has `steps` timed decode steps: a busy
    machine slows both alike."""
    arms = {name: Arm(engine, tokenizer, name == "json_schema", batch, seed, top_p) for name, engine in engines.items()}
    while min(len(a.times) for a in arms.values()) < steps:
        for arm in arms.values():
            arm.step()
    return {name: arm.close() for name, arm in arms.items()}


def compile_costs(tokenizer, repeat: int) -> dict:
    """ms to build the compiler's vocabulary (once per worker), to compile the schema cold, and to get it cached."""
    from common.tools import tool_grammar
    from tests.test_constraints_tools import TOOLS
    from worker.constraints import ConstraintCompiler

    t0 = time.perf_counter()
    compiler = ConstraintCompiler(tokenizer)
    vocab_ms = (time.perf_counter() - t0) * 1e3
    out: dict = {"vocabulary_build_ms": vocab_ms}
    formats = {"json_schema": {"json_schema": json.dumps(SCHEMA)}, "tool_grammar_2_tools": tool_grammar(TOOLS, "auto")}
    for name, fmt in formats.items():
        cold, cached = [], []
        for i in range(repeat):
            compiler._cache.clear()
            t0 = time.perf_counter()
            compiler.compile(fmt)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            compiler.compile(fmt)
            cached.append(time.perf_counter() - t0)
        out[name] = {"cold_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(cached) * 1e3,
                     "bytes": len(next(iter(fmt.values())))}
    return out


def main(
    rounds: int = typer.Option(3, help="interleaved rounds of both arms"),
    steps: int = typer.Option(60, help="timed decode steps per arm and round"),
    batch: int = typer.Option(16),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(0, help="torch intra-op threads (0 = torch's default)"),
    top_p: float = typer.Option(1.0, help="both arms' top_p (temperature 1)"),
    out: Path = typer.Option(RESULTS / "constraints.json"),
) -> None:
    """Decode tok/s with and without a JSON schema on every turn, and the compile cost; table + JSON."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from worker.engine import Engine
    from worker.tokenizer import WorldTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = WorldTokenizer()
    model = _model(device)
    # Two engines on one model; the schema arm's compiler is built before any turn (its cost is timed below).
    engines = {arm: Engine(model, tokenizer, max_batch=batch, max_queued=4 * batch) for arm in ("none", "json_schema")}
    engines["json_schema"].constraints  # noqa: B018
    decode_round(engines, tokenizer, batch, 8, seed=99, top_p=top_p)  # warm-up of both paths
    runs: dict[str, list[dict]] = {"none": [], "json_schema": []}
    for r in range(rounds):
        for arm, result in decode_round(engines, tokenizer, batch, steps, seed=r, top_p=top_p).items():
            runs[arm].append(result)
    tok_s = {arm: statistics.median(x["tok_s"] for x in v) for arm, v in runs.items()}
    costs = compile_costs(tokenizer, repeat=5)
    report = {
        "device": device, "batch": batch, "top_p": top_p, "temperature": 1.0, "rounds": rounds,
        "timed_decode_steps": steps,
        "torch_threads": torch.get_num_threads(), "model": "random L12 D768 fp32", "schema": SCHEMA,
        "decode_tok_s": tok_s, "ratio_json_schema_vs_none": tok_s["json_schema"] / tok_s["none"],
        "compile": costs, "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    c = Console()
    t = Table(title=f"B={batch} decode, random L12 D768 fp32, {device}, T 1 top_p {top_p}, medians of {rounds} "
                    f"rounds x {steps} steps")
    for col in ("turns", "decode tok/s", "step ms", "turns completed / round", "vs none"):
        t.add_column(col, justify="right")
    for arm, v in runs.items():
        t.add_row(arm, f"{tok_s[arm]:.0f}", f"{statistics.median(x['step_ms_median'] for x in v):.1f}",
                  f"{statistics.median(x['turns_completed'] for x in v):.0f}", f"{tok_s[arm] / tok_s['none']:.2f}x")
    c.print(t)
    t = Table(title="compile cost (ms, medians of 5)")
    for col in ("format", "bytes", "cold", "cached"):
        t.add_column(col, justify="right")
    for name in ("json_schema", "tool_grammar_2_tools"):
        t.add_row(name, str(costs[name]["bytes"]), f"{costs[name]['cold_ms']:.2f}", f"{costs[name]['cached_ms']:.3f}")
    c.print(t)
    c.print(f"vocabulary for the compiler (once per worker): {costs['vocabulary_build_ms']:.0f} ms; JSON: {out}")


if __name__ == "__main__":
    typer.run(main)
