"""CPU kernel choice: the automatic kernel against each kernel pinned, same checkpoint, in one run.

For fp32 and bf16: prefill of one 512-token prompt, decode at B=1 and aggregate decode at B=8 and B=32, with
`kernel="auto"` (what a worker runs by default), "native" and "onednn" pinned, and where the dual kernel exists
"dual-perop" (auto's kernels in the torch per-op block: what auto ran for large calls before session 7). Each
configuration is measured in its own subprocess by bench.bench_engine's `--one` mode, interleaved over rounds;
medians. The goal (issue 13): the
automatic kernel within 0.95x of the best pinned one at B=1 and B=32 for both dtypes.
Usage: `python -m bench.bench_kernels [--rounds 3] [--shape 12x768]`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import typer

from bench.bench_engine import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# "dual-perop": dual's Linears in the torch per-op block, which is how "auto" ran calls of ONEDNN_FROM_ROWS rows or
# more before the native block took oneDNN weights (session 7): the baseline of that change
KERNELS = ("auto", "native", "onednn", "dual-perop")
METRICS = ("prefill", "1", "8", "32")  # prefill tok/s, then decode tok/s by batch size


def _one(engine: str, checkpoint: Path, prefill_len: int, decode_steps: int) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_engine", "--one", engine, "--checkpoint", str(checkpoint),
           "--prefill-len", str(prefill_len), "--decode-steps", str(decode_steps)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{engine} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(
    rounds: int = typer.Option(3, help="interleaved rounds per configuration"),
    shape: str = typer.Option("12x768", help="n_layer x n_embd of the random checkpoint"),
    dtypes_csv: str = typer.Option("fp32,bf16", "--dtypes"),
    prefill_len: int = typer.Option(512),
    decode_steps: int = typer.Option(16),
    out: Path = typer.Option(RESULTS / "kernels.json"),
) -> None:
    """Print the table (tok/s medians, auto / best pinned) and write JSON."""
    from rich.console import Console
    from rich.table import Table

    from worker.checkpoint import make_random_checkpoint

    n_layer, n_embd = (int(v) for v in shape.split("x"))
    ckpt = ROOT / "bench" / ".cache" / f"random-L{n_layer}-D{n_embd}-fp32.pth"
    if not ckpt.exists():
        make_random_checkpoint(ckpt, n_layer, n_embd, seed=0)
    from worker.linear import dual_helps

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    configs = [(dt, k) for dt in dtypes_csv.split(",") for k in KERNELS
               if k != "dual-perop" or dual_helps(dtypes[dt])]  # no dual kernel where oneDNN does not help
    runs: dict[str, list[dict]] = {f"{dt}-{k}": [] for dt, k in configs}
    for r in range(rounds):
        for dt, k in configs:
            engine = f"ours-{dt}" + ("" if k == "auto" else f"-{k}")
            runs[f"{dt}-{k}"].append(_one(engine, ckpt, prefill_len, decode_steps))
            print(f"round {r + 1}/{rounds} {dt}-{k}: done", file=sys.stderr)

    def value(x: dict, metric: str) -> float:
        return x["prefill_tok_s"] if metric == "prefill" else x["decode_tok_s"][metric]

    summary = {name: {"kernel": xs[0]["kernel"], **{m: statistics.median(value(x, m) for x in xs) for m in METRICS}}
               for name, xs in runs.items()}
    ratios = {}
    for dt in dtypes_csv.split(","):
        for m in METRICS:
            best = max(summary[f"{dt}-{k}"][m] for k in ("native", "onednn"))  # the kernels a user can pin
            ratios[f"{dt} {m}"] = summary[f"{dt}-auto"][m] / best
            if f"{dt}-dual-perop" in summary:
                ratios[f"{dt} {m} over dual-perop"] = summary[f"{dt}-auto"][m] / summary[f"{dt}-dual-perop"][m]

    table = Table(title=f"CPU kernels, L{n_layer} D{n_embd}: tok/s (medians of {rounds} rounds)")
    for col in ("config", "kernel", f"prefill {prefill_len}", "decode B=1", "B=8 aggregate", "B=32 aggregate"):
        table.add_column(col, justify="right" if col not in ("config", "kernel") else "left")
    for name, s in summary.items():
        table.add_row(name, s["kernel"], *(f"{s[m]:.1f}" for m in METRICS))
    for dt in dtypes_csv.split(","):
        table.add_row(f"{dt} auto / best", "", *(f"{ratios[f'{dt} {m}']:.2f}x" for m in METRICS))
        if f"{dt}-dual-perop" in summary:
            table.add_row(f"{dt} auto / dual-perop", "",
                          *(f"{ratios[f'{dt} {m} over dual-perop']:.2f}x" for m in METRICS))
    Console().print(table)
    report = {"shape": {"n_layer": n_layer, "n_embd": n_embd}, "machine": machine_info(), "rounds": rounds,
              "prefill_len": prefill_len, "decode_steps": decode_steps, "tok_s": summary,
              "auto_over_best_pinned": ratios, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    typer.run(main)
