"""Engine benchmark: this engine against the `rwkv` reference package on the same checkpoint, in one run.

Each configuration runs in its own subprocess (so peak RSS is its own) and the configurations are interleaved
over several rounds; the table shows medians. Usage: `python -m bench.bench_engine [--rounds 3] [--shape 12x768]`.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(engine: str, checkpoint: str, prefill_len: int, decode_steps: int, batches: list[int]) -> dict:
    """Measure one engine configuration in this process; returns a dict of medians."""
    import torch

    torch.manual_seed(0)
    prompt = torch.randint(0, 65536, (prefill_len,)).tolist()
    res: dict = {"engine": engine}
    if engine == "reference-fp32":
        from tests.reference import reference_model

        ref = reference_model(checkpoint, "cpu fp32")
        ref.forward(prompt[:16], None)
        res["prefill_tok_s"] = prefill_len / statistics.median(_timed(lambda: ref.forward(prompt, None), 3))
        _, state = ref.forward(prompt[:8], None)
        box = [state]

        def steps():
            for t in range(decode_steps):
                _, box[0] = ref.forward([prompt[t]], box[0])

        steps()
        res["decode_tok_s"] = {"1": decode_steps / statistics.median(_timed(steps, 5))}
    else:
        from worker.model import RWKV5

        _, dt, *kernel = engine.split("-")  # ours-<dtype>[-<kernel>[-perop]]
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        model = RWKV5.from_checkpoint(checkpoint, dtype=dtype, kernel=kernel[0] if kernel else "auto")
        if kernel[1:] == ["perop"]:  # the torch per-op block instead of the fused native one (a baseline)
            model._native_blocks = None
        res["state_bytes"], res["kernel"] = model.config.state_bytes, model.kernel
        toks = torch.tensor([prompt])
        model.forward(toks[:, :16], model.init_state(1))
        res["prefill_tok_s"] = prefill_len / statistics.median(
            _timed(lambda: model.forward(toks, model.init_state(1)), 3))
        res["decode_tok_s"] = {}
        for b in batches:
            _, state = model.forward(torch.tensor([prompt[:8]] * b), model.init_state(b))
            box = [state, state.clone()]  # two buffers, alternating, as the engine's decode lane does
            col = torch.tensor(prompt[:decode_steps]).view(-1, 1).expand(-1, b).contiguous()

            def steps():
                for t in range(decode_steps):
                    _, new = model.forward(col[t].view(b, 1), box[0], out=box[1])
                    box[:] = [new, box[0]]

            steps()
            res["decode_tok_s"][str(b)] = b * decode_steps / statistics.median(_timed(steps, 5 if b < 32 else 3))
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def memory_bandwidth_gbs() -> float:
    """Read bandwidth of this machine with torch's threads: sum over a 512 MiB buffer (median of 5)."""
    import torch

    buf = torch.ones(128 * 2**20)
    buf.sum()
    return buf.numel() * 4 / statistics.median(_timed(lambda: buf.sum(), 5)) / 1e9


def machine_info() -> dict:
    """CPU model, the vector extensions that decide which kernels run, bandwidth and FMA peak."""
    from worker import cpu_kernels

    info: dict = {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_kernels.cpu_flags()
    info["vector_extensions"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    info["read_bandwidth_gb_s"] = memory_bandwidth_gbs()

    if cpu_kernels.available():  # register-only FMA loops on every thread: no fp32 kernel can beat this
        info["fma_peak_gflop_s"] = statistics.median(cpu_kernels.peak_gflops() for _ in range(3))
    return info


DEFAULT_ENGINES = "reference-fp32,ours-fp32,ours-bf16,ours-fp32-onednn"


def main(
    rounds: int = typer.Option(3, help="interleaved rounds per configuration"),
    engines_csv: str = typer.Option(DEFAULT_ENGINES, "--engines",
                                    help="reference-fp32 and ours-<fp32|bf16|fp16>[-<native|onednn|torch>]"),
    shape: str = typer.Option("12x768", help="n_layer x n_embd of the random checkpoint"),
    prefill_len: int = typer.Option(512),
    decode_steps: int = typer.Option(16),
    out: Path = typer.Option(RESULTS / "engine.json"),
    one: str = typer.Option("", hidden=True),
    checkpoint: str = typer.Option("", hidden=True),
) -> None:
    """Benchmark prefill and decode of this engine and the reference; print a table and write JSON."""
    batches = [1, 8, 32]
    if one:  # child process: measure one configuration, print JSON
        print(json.dumps(measure(one, checkpoint, prefill_len, decode_steps, batches)))
        return
    from rich.console import Console
    from rich.table import Table

    from worker.checkpoint import make_random_checkpoint

    n_layer, n_embd = (int(v) for v in shape.split("x"))
    ckpt = ROOT / "bench" / ".cache" / f"random-L{n_layer}-D{n_embd}-fp32.pth"
    if not ckpt.exists():
        make_random_checkpoint(ckpt, n_layer, n_embd, seed=0)
    engines = engines_csv.split(",")
    for required in ("reference-fp32", "ours-fp32", "ours-bf16"):
        if required not in engines:
            raise typer.BadParameter(f"{required} is needed for the ratios", param_hint="--engines")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for r in range(rounds):
        for e in engines:
            cmd = [sys.executable, "-m", "bench.bench_engine", "--one", e, "--checkpoint", str(ckpt),
                   "--prefill-len", str(prefill_len), "--decode-steps", str(decode_steps)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                raise SystemExit(f"{e} failed:\n{p.stderr[-3000:]}")
            runs[e].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{rounds} {e}: done", file=sys.stderr)

    def med(e: str, key: str, b: str | None = None) -> float | None:
        vals = [x[key][b] if b else x[key] for x in runs[e] if (b is None or b in x.get(key, {}))]
        return statistics.median(vals) if vals else None

    machine = machine_info()
    bw = machine["read_bandwidth_gb_s"]
    summary = {}
    for e in engines:
        summary[e] = {
            "prefill_tok_s": med(e, "prefill_tok_s"),
            "decode_tok_s": {b: med(e, "decode_tok_s", b) for b in map(str, batches) if med(e, "decode_tok_s", b)},
            "peak_rss_mib": med(e, "peak_rss_bytes") / 2**20,
            "kernel": runs[e][0].get("kernel", "-"),
        }
    ref_dec, ref_pre = summary["reference-fp32"]["decode_tok_s"]["1"], summary["reference-fp32"]["prefill_tok_s"]
    from worker.model import config_from_params, read_checkpoint

    params = read_checkpoint(ckpt)
    cfg = config_from_params(params)
    # Weights read per decoded token at B=1: every matrix but the embedding (a row lookup), in fp32 here
    fp32_bytes_per_token = 4 * sum(t.numel() for n, t in params.items() if t.dim() == 2 and n != "emb.weight")
    ratios = {
        "decode_b1_fp32_vs_ref": summary["ours-fp32"]["decode_tok_s"]["1"] / ref_dec,
        "decode_b1_bf16_vs_ref_fp32": summary["ours-bf16"]["decode_tok_s"]["1"] / ref_dec,
        "prefill_fp32_vs_ref": summary["ours-fp32"]["prefill_tok_s"] / ref_pre,
        "b32_vs_b1_fp32": summary["ours-fp32"]["decode_tok_s"]["32"] / summary["ours-fp32"]["decode_tok_s"]["1"],
        "b32_vs_b1_bf16": summary["ours-bf16"]["decode_tok_s"]["32"] / summary["ours-bf16"]["decode_tok_s"]["1"],
        "ref_decode_fraction_of_bandwidth": ref_dec * fp32_bytes_per_token / 1e9 / bw,
        "ours_fp32_decode_fraction_of_bandwidth":
            summary["ours-fp32"]["decode_tok_s"]["1"] * fp32_bytes_per_token / 1e9 / bw,
        "ours_bf16_decode_fraction_of_bandwidth":
            summary["ours-bf16"]["decode_tok_s"]["1"] * fp32_bytes_per_token / 2 / 1e9 / bw,
    }
    # What bounds B=32: every decoded token costs 2 FLOPs per matrix weight.
    flops_per_token = fp32_bytes_per_token / 2
    for e in ("ours-fp32", "ours-bf16"):
        b32 = summary[e]["decode_tok_s"]["32"]
        ratios[f"{e}_b32_gflop_s"] = b32 * flops_per_token / 1e9
        if "fma_peak_gflop_s" in machine:
            # B=32 at the FMA peak with nothing else to do, over the B=1 reached: the most the ratio could be
            ceiling = machine["fma_peak_gflop_s"] * 1e9 / flops_per_token
            ratios[f"{e}_b32_vs_b1_ceiling_at_fma_peak"] = ceiling / summary[e]["decode_tok_s"]["1"]
    report = {
        "shape": {"n_layer": n_layer, "n_embd": n_embd, "vocab": 65536},
        "machine": machine, "flops_per_token": flops_per_token,
        "rounds": rounds, "prefill_len": prefill_len, "decode_steps": decode_steps,
        "state_bytes": cfg.state_bytes, "median": summary, "ratios": ratios, "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    t = Table(title=f"RWKV-5.2 L{n_layer} D{n_embd} random, CPU, medians of {rounds} interleaved rounds")
    for col in ("engine", "kernel", f"prefill {prefill_len} tok/s", "decode B=1", "B=8 agg", "B=32 agg",
                "peak RSS MiB"):
        t.add_column(col, justify="right")
    for e in engines:
        s = summary[e]
        d = s["decode_tok_s"]
        t.add_row(e, s["kernel"], f"{s['prefill_tok_s']:.0f}", f"{d['1']:.1f}",
                  f"{d.get('8', 0):.0f}" if "8" in d else "-",
                  f"{d.get('32', 0):.0f}" if "32" in d else "-", f"{s['peak_rss_mib']:.0f}")
    c = Console()
    c.print(t)
    c.print(f"{machine['cpu']} ({', '.join(machine.get('vector_extensions', []))}), {machine['threads']} threads; "
            f"read bandwidth {bw:.1f} GB/s; FMA peak {machine.get('fma_peak_gflop_s', float('nan')):.0f} GFLOP/s")
    c.print(f"state bytes per session: {cfg.state_bytes:,}")
    for k, v in ratios.items():
        c.print(f"{k}: {v:.2f}")
    c.print(f"JSON: {out}")


if __name__ == "__main__":
    typer.run(main)
