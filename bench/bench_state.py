"""State record benchmark: record size, encode/decode time against a plain copy, and storage-dtype drift.

1. Size and speed, per storage dtype (fp32, bf16, fp16: what RWKV_WORKER_STATE_STORAGE_DTYPE sets), at the 12B
   shape (L32 D5120 H80) and at L12 D768: the record's bytes; `state_to_buffer` (what the worker writes to
   Redis) and `state_from_bytes` (what it reads back), medians of interleaved runs, over a plain numpy copy of
   the same record bytes (`bytes(memoryview)` shown too: at 43 MB it pays 4 KiB page faults, ~3x the numpy
   copy), and over a copy of the fp32 state (what a 16-bit record's decode writes and its encode reads).
2. Drift: 20 chat turns of 16 greedy tokens each, each turn's state stored and reloaded through a record of
   that dtype (the worker's path), against the same turns with fp32 storage (exact), on a random checkpoint and
   on a trained one. Teacher-forced (both runs read the fp32 run's tokens): max |logit diff| over the fp32
   run's logit RMS at that position, and greedy (argmax) agreement, at the 320 predicted positions.
   Free-running: the share of the 320 generated tokens that equal the fp32 run's.

Usage: `python -m bench.bench_state [--trained runs/demo/full/model.pth] [--runs 15]`; writes
bench/results/state.json and prints tables. Without a trained checkpoint the drift table has the random one
only (`python -m tuning.demo` makes one; see docs/benchmarks.md for the run used).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHAPES = {"12B (L32 D5120 H80)": (32, 5120, 80), "L12 D768 H12": (12, 768, 12)}
TURNS, TOKENS_PER_TURN = 20, 16


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed(runs: int) -> dict:
    """Record bytes, encode/decode ms and copy ms per shape and storage dtype (each a median of `runs`)."""
    from worker.state import STORAGE_DTYPES, State, state_from_bytes, state_to_buffer, state_to_bytes

    out: dict = {}
    for name, (L, D, H) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        state = State(torch.randn(L, 1, D, generator=g), torch.randn(L, 1, H, 64, 64, generator=g) * 0.5,
                      torch.randn(L, 1, D, generator=g))
        fp = bytes(range(32))
        records = {k: state_to_bytes(state, fp, 1000, dt, dt) for k, dt in STORAGE_DTYPES.items()}
        fp32_bytes = state.nbytes
        ops = {}
        for k, dt in STORAGE_DTYPES.items():
            rec = records[k]
            ops[(k, "encode")] = lambda dt=dt: state_to_buffer(state, fp, 1000, dt, dt)
            ops[(k, "encode_to_bytes")] = lambda dt=dt: state_to_bytes(state, fp, 1000, dt, dt)
            ops[(k, "decode")] = lambda rec=rec: state_from_bytes(rec, fp)
            ops[(k, "copy_numpy")] = lambda rec=rec: np.frombuffer(rec, dtype=np.uint8).copy()
            ops[(k, "copy_bytes")] = lambda rec=rec: bytes(memoryview(rec))
        for fn in ops.values():  # warm-up (first-touch of the allocator, torch's thread pool)
            fn()
        samples: dict = {key: [] for key in ops}
        for _ in range(runs):  # interleaved: a slow moment of this shared machine hits every operation alike
            for key, fn in ops.items():
                samples[key].append(_median_ms(fn, 1))
        shape_out = {"fp32_state_bytes": fp32_bytes}
        fp32_copy = statistics.median(samples[("fp32", "copy_numpy")])
        for k in STORAGE_DTYPES:
            ms = {op: statistics.median(samples[(k, op)]) for op in
                  ("encode", "encode_to_bytes", "decode", "copy_numpy", "copy_bytes")}
            copy = ms["copy_numpy"]
            shape_out[k] = {
                "record_bytes": len(records[k]),
                "record_vs_fp32": len(records[k]) / len(records["fp32"]),
                **{f"{op}_ms": round(v, 3) for op, v in ms.items()},
                "encode_vs_copy": round(ms["encode"] / copy, 2),
                "decode_vs_copy": round(ms["decode"] / copy, 2),
                "encode_to_bytes_vs_copy": round(ms["encode_to_bytes"] / copy, 2),
                # What a 16-bit record's decode writes (and its encode reads): the fp32 state, twice its bytes.
                "encode_vs_fp32_state_copy": round(ms["encode"] / fp32_copy, 2),
                "decode_vs_fp32_state_copy": round(ms["decode"] / fp32_copy, 2),
            }
        out[name] = shape_out
        print(f"speed {name}: done", file=sys.stderr)
    return out


def _prompts(tokenizer) -> list[list[int]]:
    """20 chat user turns (pydoc questions, as the tuning demo's data asks them) as token ids."""
    from common.templates import get_template
    from tuning.data import pydoc_dialogues

    chat = get_template("chat")
    questions = [d[0].text for d in pydoc_dialogues(seed=0)][:TURNS]
    return [tokenizer.encode(chat.user_turn(q)) for q in questions]


def _free_run(model, prompts, store) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy turns token by token; `store` maps each turn's final state to the state the next turn loads."""
    state = model.init_state(1)
    tokens, wkv = [], []
    for prompt in prompts:
        logits, state = model.forward(torch.tensor([prompt]), state)
        out = []
        for _ in range(TOKENS_PER_TURN):
            out.append(int(logits[0].argmax()))
            logits, state = model.forward(torch.tensor([[out[-1]]]), state)
        tokens.append(out)
        state = store(state)
        wkv.append(state.wkv)
    return tokens, wkv


def _teacher_forced(model, prompts, turn_tokens, store) -> list[torch.Tensor]:
    """Each turn's 16 predicting positions' logits (16, V), reading the given tokens; state through `store`."""
    state = model.init_state(1)
    logits_per_turn = []
    for prompt, gen in zip(prompts, turn_tokens):
        seq = prompt + gen
        logits, state = model.forward(torch.tensor([seq]), state, all_logits=True)
        logits_per_turn.append(logits[0, len(prompt) - 1 : len(seq) - 1].clone())
        state = store(state)
    return logits_per_turn


STORAGE_VARIANTS = {  # name: (shift dtype, WKV dtype); the worker setting stores both in the same dtype
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16 WKV, fp32 shifts": (torch.float32, torch.bfloat16),
    "fp16 WKV, fp32 shifts": (torch.float32, torch.float16),
}


def drift(checkpoint: Path, tokenizer) -> dict:
    from worker.model import RWKV5
    from worker.state import state_from_bytes, state_to_buffer

    model = RWKV5.from_checkpoint(checkpoint)
    c = model.config
    prompts = _prompts(tokenizer)

    def through(dtype: torch.dtype, wkv_dtype: torch.dtype):
        def store(state):
            record = state_to_buffer(state, model.fingerprint, 0, dtype, wkv_dtype)
            return state_from_bytes(bytes(record), model.fingerprint)[0]
        return store

    ref_tokens, ref_wkv = _free_run(model, prompts, lambda s: s)
    ref_logits = _teacher_forced(model, prompts, ref_tokens, lambda s: s)
    rows = {}
    for name, (dt, wdt) in STORAGE_VARIANTS.items():
        tf = _teacher_forced(model, prompts, ref_tokens, through(dt, wdt))
        rel = [((a - b).abs().amax(-1) / b.pow(2).mean(-1).sqrt()) for a, b in zip(tf, ref_logits)]  # per position
        agree_tf = [(a.argmax(-1) == b.argmax(-1)).float() for a, b in zip(tf, ref_logits)]
        free_tokens, _ = _free_run(model, prompts, through(dt, wdt))
        same = [sum(x == y for x, y in zip(a, b)) for a, b in zip(free_tokens, ref_tokens)]
        # How far one reload moves the WKV state: relative error of the stored state after turn 1.
        exact1 = _state_after(model, prompts[0], ref_tokens[0])
        after1 = through(dt, wdt)(exact1)
        rows[name] = {
            "max_logit_diff_over_rms": float(max(r.max() for r in rel)),
            "median_logit_diff_over_rms": float(torch.cat(rel).median()),
            "last_turn_max_logit_diff_over_rms": float(rel[-1].max()),
            "per_turn_max_logit_diff_over_rms": [round(float(r.max()), 6) for r in rel],
            "greedy_agreement_teacher_forced_pct": round(100 * float(torch.cat(agree_tf).mean()), 2),
            "greedy_agreement_free_running_pct": round(100 * sum(same) / (TURNS * TOKENS_PER_TURN), 2),
            "free_running_turns_identical": sum(s == TOKENS_PER_TURN for s in same),
            "wkv_rel_error_one_reload": float((after1.wkv - exact1.wkv).norm() / exact1.wkv.norm()),
        }
        print(f"drift {checkpoint.name} {name}: done", file=sys.stderr)
    return {"checkpoint": str(checkpoint), "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
            "turns": TURNS, "tokens_per_turn": TOKENS_PER_TURN,
            "prompt_tokens": [len(p) for p in prompts],
            "wkv_abs_max_fp32_run": float(max(w.abs().max() for w in ref_wkv)),
            "storage": rows}


def _state_after(model, prompt: list[int], gen: list[int]):
    return model.forward(torch.tensor([prompt + gen]), model.init_state(1))[1]


def machine() -> dict:
    import crc32c

    from bench.bench_engine import machine_info

    info = machine_info()
    from worker import cpu_kernels

    flags = cpu_kernels.cpu_flags()
    info["checksum"] = {"crc32c": "hardware" if crc32c.hardware_based else "software",
                        "sse4_2": "sse4_2" in flags, "pclmulqdq": "pclmulqdq" in flags}
    info["torch_threads"] = torch.get_num_threads()
    info["numpy"] = np.__version__
    info["torch"] = torch.__version__
    info["load_average_at_start"] = os.getloadavg()
    try:
        info["transparent_hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return info


def main(
    runs: int = typer.Option(15, help="interleaved runs per operation (medians)"),
    trained: Path = typer.Option(None, help="a trained checkpoint for the drift table (e.g. tuning.demo's)"),
    trained_recipe: str = typer.Option("", help="how the trained checkpoint was made (goes into the JSON)"),
    random_shape: str = typer.Option("12x768", help="n_layer x n_embd of the random checkpoint"),
    skip_drift: bool = typer.Option(False, help="speed and sizes only"),
    out: Path = typer.Option(RESULTS / "state.json"),
) -> None:
    """Benchmark the state record: sizes, encode/decode against a copy, storage-dtype drift; table + JSON."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    info = machine()
    report: dict = {"machine": info, "runs": runs, "speed": speed(runs)}
    t = Table(title="state record per storage dtype: bytes, ms (median), ratio to a numpy copy of the record "
                    "(and of the fp32 state)")
    for col in ("shape", "storage", "record bytes", "copy", "bytes()", "encode", "enc/copy", "decode", "dec/copy",
                "enc, dec / fp32 copy", "to bytes"):
        t.add_column(col, justify="left" if col in ("shape", "storage") else "right")
    for shape, rows in report["speed"].items():
        for k, r in rows.items():
            if not isinstance(r, dict):
                continue
            t.add_row(shape, k, f"{r['record_bytes']:,}", f"{r['copy_numpy_ms']:.2f}", f"{r['copy_bytes_ms']:.2f}",
                      f"{r['encode_ms']:.2f}", f"{r['encode_vs_copy']:.2f}x", f"{r['decode_ms']:.2f}",
                      f"{r['decode_vs_copy']:.2f}x",
                      f"{r['encode_vs_fp32_state_copy']:.2f}x, {r['decode_vs_fp32_state_copy']:.2f}x",
                      f"{r['encode_to_bytes_ms']:.2f}")
    console.print(t)
    if not skip_drift:
        from worker.checkpoint import make_random_checkpoint
        from worker.tokenizer import WorldTokenizer

        tokenizer = WorldTokenizer()
        n_layer, n_embd = (int(v) for v in random_shape.split("x"))
        ckpt = ROOT / "bench" / ".cache" / f"random-L{n_layer}-D{n_embd}-fp32.pth"
        if not ckpt.exists():
            make_random_checkpoint(ckpt, n_layer, n_embd, seed=0)
        report["drift"] = {f"random L{n_layer} D{n_embd}": drift(ckpt, tokenizer)}
        if trained is not None:
            report["drift"]["trained"] = {**drift(trained, tokenizer), "recipe": trained_recipe}
        t = Table(title=f"drift vs fp32 storage: {TURNS} chat turns x {TOKENS_PER_TURN} greedy tokens, state "
                        "stored + reloaded after every turn")
        for col in ("model", "storage", "max |dlogit|/rms", "median", "last turn max", "argmax agree (forced)",
                    "free-run agree", "turns identical", "WKV rel err"):
            t.add_column(col, justify="left" if col in ("model", "storage") else "right")
        for model_name, d in report["drift"].items():
            for k, r in d["storage"].items():
                t.add_row(model_name if model_name.startswith("random") else f"{model_name} L{d['n_layer']} "
                          f"D{d['n_embd']}", k,
                          f"{r['max_logit_diff_over_rms']:.2e}", f"{r['median_logit_diff_over_rms']:.2e}",
                          f"{r['last_turn_max_logit_diff_over_rms']:.2e}",
                          f"{r['greedy_agreement_teacher_forced_pct']:.1f}%",
                          f"{r['greedy_agreement_free_running_pct']:.1f}%",
                          f"{r['free_running_turns_identical']}/{TURNS}", f"{r['wkv_rel_error_one_reload']:.1e}")
        console.print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
