"""The native block of this checkout against the one of another git revision, alternating in one process.

A change inside worker/csrc/cpu_kernels.cpp (the fused block, its elementwise loops, how it calls oneDNN) is measured
here: the revision's cpu_kernels.cpp is built as a second library (`-DRWKV_CPU_LIBRARY=rwkv_cpu_base`, beside the
checkout's `rwkv_cpu`), and the same model (the checkout's Python, weights and matmul kernels) runs its forward
through one block op or the other, ABBA over rounds, each round the median of several forwards. Shapes: a prefill
batch and decode steps of the 6x384 model of the prefill benchmarks, a 512-token prompt and decode steps of 12x768
in fp32 and bf16 (the automatic kernel: "dual" on CPUs with AVX-512, "native" elsewhere).
Usage: `python -m bench.bench_kernel_builds --base 1448a55 [--rounds 6]`.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import typer

from bench.service_common import RESULTS, checkout, machine

ROOT = Path(__file__).resolve().parent.parent
CASES = (("6x384", torch.float32, ((32, 19), (1, 19), (32, 1), (1, 1))),
         ("12x768", torch.float32, ((1, 512), (32, 1), (1, 1))),
         ("12x768", torch.bfloat16, ((1, 512), (32, 1), (1, 1))))


def build_base(revision: str, build_dir: Path) -> None:
    """Builds `revision`'s cpu_kernels.cpp as the library rwkv_cpu_base and loads it."""
    from torch.utils import cpp_extension

    from worker import cpu_kernels

    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:worker/csrc/cpu_kernels.cpp"],
                            capture_output=True, text=True, check=True).stdout
    (build_dir / "cpu_kernels_base.cpp").write_text(source)
    cpp_extension.load(name="rwkv_cpu_base", sources=[str(build_dir / "cpu_kernels_base.cpp")],
                       build_directory=str(build_dir), is_python_module=False,
                       extra_cflags=[*cpu_kernels._CFLAGS, "-DRWKV_CPU_LIBRARY=rwkv_cpu_base"],
                       extra_ldflags=["-fopenmp"])


def median_forward(model, tokens, state, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        model.forward(tokens, state)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(base: str = typer.Option(..., help="the git revision to compare against (its cpu_kernels.cpp)"),
         rounds: int = typer.Option(6, help="alternations per shape"),
         out: Path = typer.Option(RESULTS / "kernel_builds.json")) -> None:
    from worker import cpu_kernels
    from worker.checkpoint import make_random_checkpoint
    from worker.model import RWKV5

    if not cpu_kernels.available():
        raise SystemExit(f"native kernels unavailable: {cpu_kernels.why_unavailable()}")
    load_before, started = os.getloadavg(), time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_base(base, Path(tmp))
        ops = {"base": torch.ops.rwkv_cpu_base.block.default, "checkout": torch.ops.rwkv_cpu.block.default}
        for shape, dtype, shapes in CASES:
            n_layer, n_embd = (int(x) for x in shape.split("x"))
            checkpoint = make_random_checkpoint(Path(tmp) / f"{shape}.pth", n_layer, n_embd, seed=0, dtype=dtype)
            model = RWKV5.from_checkpoint(checkpoint, dtype=dtype)
            for batch, length in shapes:
                tokens = torch.randint(0, 65536, (batch, length), generator=torch.Generator().manual_seed(0))
                state = model.init_state(batch)
                n = 5 if batch * length >= 512 else 15
                times: dict[str, list[float]] = {name: [] for name in ops}
                with torch.inference_mode():
                    for r in range(rounds):
                        for name in (list(ops) if r % 2 == 0 else list(ops)[::-1]):
                            cpu_kernels.block = ops[name]
                            model.forward(tokens, state)  # warm
                            times[name].append(median_forward(model, tokens, state, n))
                b, c = statistics.median(times["base"]), statistics.median(times["checkout"])
                key = f"{shape} {str(dtype).removeprefix('torch.')} {batch}x{length}"
                results[key] = {"kernel": model.kernel, "base_ms": b * 1e3, "checkout_ms": c * 1e3,
                                "speedup": b / c, "rounds_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}
                print(f"{key:26s} ({model.kernel}) base {b * 1e3:8.2f} ms  checkout {c * 1e3:8.2f} ms  "
                      f"{b / c:5.2f}x", flush=True)
    doc = {"base": subprocess.run(["git", "-C", str(ROOT), "rev-parse", base], capture_output=True, text=True,
                                  check=True).stdout.strip(),
           "results": results, "config": {"rounds": rounds}, "checkout": checkout(),
           "machine": machine(load_before, started), "threads": torch.get_num_threads()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    typer.run(main)
