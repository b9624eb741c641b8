"""Tokenizer throughput: reference TRIE_TOKENIZER vs WorldTokenizer (both backends) on the test corpus.

Run from the repository root: `python bench/bench_tokenizer.py` (writes bench/results/tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tests` (the corpus builder) importable
    sys.path.insert(0, str(ROOT))


def _median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times = []
    result = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer.json")
    args = parser.parse_args(argv)

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from tests.test_tokenizer import build_corpus
    from worker.tokenizer import WorldTokenizer, default_world_vocab_path

    corpus = build_corpus()
    data = corpus.encode("utf-8")
    mb = len(data) / 1e6
    vocab = str(default_world_vocab_path())

    candidates: list[tuple[str, Callable[[], object]]] = [
        ("reference TRIE_TOKENIZER", lambda: TRIE_TOKENIZER(vocab)),
        ("WorldTokenizer (python regex)", lambda: WorldTokenizer(use_rust=False)),
        ("WorldTokenizer (default)", lambda: WorldTokenizer()),
    ]
    loaded = []
    for name, make in candidates:
        re.purge()  # the regex module caches compiled patterns: time each load from scratch
        load_s, tok = _median_seconds(make, 1)
        loaded.append((name, getattr(tok, "backend", "reference"), load_s, tok.encode))  # type: ignore[attr-defined]

    # Round-robin over the tokenizers in each repetition, so that load from other jobs on this shared
    # machine falls on all of them alike rather than on whichever ran during a busy spell.
    times: dict[str, list[float]] = {name: [] for name, *_ in loaded}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.runs):
        for name, _backend, _load, encode in loaded:
            start = time.perf_counter()
            outputs[name] = encode(corpus)
            times[name].append(time.perf_counter() - start)

    expected = outputs[loaded[0][0]]
    rows = []
    for name, backend, load_s, _encode in loaded:
        enc_s = statistics.median(times[name])
        rows.append({
            "name": name, "backend": backend, "load_s": round(load_s, 3), "encode_s": round(enc_s, 4),
            "mb_per_s": round(mb / enc_s, 2), "tokens": len(outputs[name]),
            "identical_to_reference": outputs[name] == expected,
        })
    base = rows[0]["mb_per_s"]
    for row in rows:
        row["ratio_vs_reference"] = round(row["mb_per_s"] / base, 2)

    print(f"corpus: {len(data):,} bytes, {len(corpus):,} chars; median of {args.runs} runs")
    print(f"{'tokenizer':32} {'backend':9} {'load s':>7} {'MB/s':>8} {'ratio':>6} {'same ids':>9}")
    for row in rows:
        print(f"{row['name']:32} {row['backend']:9} {row['load_s']:7.2f} {row['mb_per_s']:8.2f} "
              f"{row['ratio_vs_reference']:6.2f} {str(row['identical_to_reference']):>9}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "tokenizer",
        "corpus_bytes": len(data),
        "corpus_chars": len(corpus),
        "runs": args.runs,
        "statistic": "median of the runs, tokenizers timed round-robin",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "shared 2-core CPU; other jobs may run at the same time",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # > ~1 means the timings were contended
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
