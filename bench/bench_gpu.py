"""GPU benchmark at the seed model's shape (RWKV-5 12B: L32 D5120, random weights made on the GPU).

Decode tok/s at B=1 against the HBM roofline (weight bytes per token / measured copy bandwidth) and the B=64
aggregate. Usage on a CUDA machine: `python -m bench.bench_gpu [--n-layer 32 --n-embd 5120 --dtype fp16]`."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer

from worker.checkpoint import random_params
from worker.model import RWKV5

RESULTS = Path(__file__).resolve().parent / "results"


def _cuda_time(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(n_layer: int = 32, n_embd: int = 5120, dtype: str = "fp16", steps: int = 32,
         out: Path = RESULTS / "gpu.json") -> None:
    """Measure decode on the GPU at the 12B shape; print a table and write JSON."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    params = random_params(n_layer, n_embd, seed=0, dtype=dt, device="cuda")
    weight_bytes = sum(t.numel() * t.element_size() for k, t in params.items() if k != "emb.weight")
    model = RWKV5(params, device="cuda", dtype=dt)
    del params
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_s = _cuda_time(buf.clone, 5)
    hbm_gbs = 2 * buf.numel() / copy_s / 1e9  # read + write
    del buf
    res = {"device": torch.cuda.get_device_name(), "shape": [n_layer, n_embd], "dtype": dtype,
           "weight_bytes": weight_bytes, "hbm_copy_gb_s": hbm_gbs, "decode_tok_s": {}}
    for b in (1, 8, 64):
        state = model.init_state(b)
        tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")
        box = [state]

        def run():
            for _ in range(steps):
                _, box[0] = model.forward(tok, box[0])

        res["decode_tok_s"][str(b)] = b * steps / _cuda_time(run, 3)
    prompt = torch.zeros(1, 512, dtype=torch.long, device="cuda")
    res["prefill_512_tok_s"] = 512 / _cuda_time(lambda: model.forward(prompt, model.init_state(1)), 3)
    res["roofline_b1_tok_s"] = hbm_gbs * 1e9 / weight_bytes
    res["b1_fraction_of_roofline"] = res["decode_tok_s"]["1"] / res["roofline_b1_tok_s"]
    res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    for k, v in res.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    typer.run(main)
