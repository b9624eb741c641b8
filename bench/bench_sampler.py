"""Sampler benchmark: per-step `sample_batch` time, the batch-vectorized sampler against the per-row one it replaced
(bench/_sampler_reference.py), in the same run, and as a share of a B=32 decode step of the L12 D768 model.

Logits are synthetic (randn * 3 over the 65,536-token vocab: the top-p 0.3 mass lies in the first ~100 tokens, so
top-k 50 decides the head); each configuration first runs `--warmup` steps so the penalty counts hold that many
tokens, then `--steps` timed steps, each on fresh logits. Old and new alternate over `--rounds` rounds; medians.
Usage: `python -m bench.bench_sampler [--rounds 5] [--device cpu]`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VOCAB = 65536


def _params(kind: str, seed: int):
    from worker.sampler import SamplingParams

    if kind == "greedy":
        return SamplingParams(temperature=0, seed=seed)
    # the chat demo's settings with a top-k on top
    return SamplingParams(temperature=1.0, top_p=0.3, top_k=50, presence_penalty=0.5, frequency_penalty=0.5,
                          penalty_decay=0.996, banned_tokens=(0,), seed=seed)


def step_ms(impl: str, kind: str, batch: int, warmup: int, steps: int, device: str) -> float:
    """Median ms of one sample_batch call over `steps` steps, after `warmup` steps of the same states."""
    import torch

    mod = __import__("bench._sampler_reference" if impl == "old" else "worker.sampler", fromlist=["x"])
    states = [mod.SamplerState(_params(kind, seed=i)) for i in range(batch)]
    g = torch.Generator().manual_seed(batch)
    logits = [(torch.randn(batch, VOCAB, generator=g) * 3).to(device) for _ in range(8)]
    for t in range(warmup):
        mod.sample_batch(logits[t % 8], states)
    times = []
    for t in range(steps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mod.sample_batch(logits[t % 8], states)  # ends in .tolist(): synchronous on any device
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def decode_step_ms(batch: int, device: str) -> float:
    """Median ms of one B-row decode forward of the random L12 D768 fp32 checkpoint (as bench_engine runs it)."""
    import torch

    from worker.checkpoint import make_random_checkpoint
    from worker.model import RWKV5

    ckpt = ROOT / "bench" / ".cache" / "random-L12-D768-fp32.pth"
    if not ckpt.exists():
        make_random_checkpoint(ckpt, 12, 768, seed=0)
    model = RWKV5.from_checkpoint(ckpt, dtype=torch.float32, device=device)
    prompt = torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(0))
    prefix = prompt.view(1, -1).expand(batch, -1).contiguous().to(model.device)
    _, state = model.forward(prefix, model.init_state(batch))
    box = [state, state.clone()]
    tok = prompt[:1].view(1, 1).expand(batch, 1).contiguous().to(model.device)
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        _, new = model.forward(tok, box[0], out=box[1])
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        box[:] = [new, box[0]]
    return statistics.median(times[2:]) * 1e3


def main(
    rounds: int = typer.Option(5, help="alternating old/new rounds per configuration"),
    warmup: int = typer.Option(64, help="steps before timing (penalty counts hold this many tokens)"),
    steps: int = typer.Option(30, help="timed steps per round"),
    device: str = typer.Option("cpu"),
    out: Path = typer.Option(RESULTS / "sampler.json"),
) -> None:
    """Time old and new sampling per step at B = 1, 8, 32; print a table and write JSON."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from bench.bench_engine import machine_info

    batches, kinds = [1, 8, 32], ["greedy", "top_p0.3_top_k50_penalties"]
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for kind in kinds:
            for b in batches:
                for impl in ("old", "new"):
                    key = f"{impl}/{kind}/{b}"
                    runs.setdefault(key, []).append(step_ms(impl, kind.split("_")[0], b, warmup, steps, device))
    median = {k: statistics.median(v) for k, v in runs.items()}
    decode_ms = decode_step_ms(32, device)
    report = {
        "device": device, "vocab": VOCAB, "rounds": rounds, "warmup_steps": warmup, "timed_steps": steps,
        "torch_threads": torch.get_num_threads(), "machine": machine_info() if device == "cpu" else {"device": device},
        "decode_step_ms_L12_D768_fp32_B32": decode_ms,
        "median_ms": median,
        "speedup": {f"{k}/{b}": median[f"old/{k}/{b}"] / median[f"new/{k}/{b}"] for k in kinds for b in batches},
        "share_of_B32_decode_step": {f"{impl}/{k}": median[f"{impl}/{k}/32"] / decode_ms
                                     for impl in ("old", "new") for k in kinds},
        "runs_ms": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    t = Table(title=f"sample_batch ms per step, V={VOCAB}, {device}, medians of {rounds} rounds x {steps} steps")
    for col in ("sampling", "B", "old ms", "new ms", "speedup", "new / B=32 decode step"):
        t.add_column(col, justify="right")
    for k in kinds:
        for b in batches:
            o, n = median[f"old/{k}/{b}"], median[f"new/{k}/{b}"]
            t.add_row(k, str(b), f"{o:.3f}", f"{n:.3f}", f"{o / n:.1f}x",
                      f"{n / decode_ms:.1%}" if b == 32 else "")
    c = Console()
    c.print(t)
    c.print(f"B=32 decode step, L12 D768 fp32: {decode_ms:.1f} ms; old sampler at B=32: "
            + ", ".join(f"{k} {median[f'old/{k}/32'] / decode_ms:.1%}" for k in kinds))
    c.print(f"JSON: {out}")


if __name__ == "__main__":
    typer.run(main)
