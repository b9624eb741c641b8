"""Offline CPU demo: fine-tune a small RWKV-5 on Python's own documentation, then state-tune a preset for it.

Data that ships with every Python: `pydoc_data.topics` -> question/answer dialogues (tuning.data) -> tokens.
Whole topics are held out for validation, and a held-out answer that also appears under a training topic (some
sections are shared between topics) is dropped, so validation measures answers about unseen topics.
1. A random-init model (World vocab) is fully fine-tuned for `--minutes`: validation perplexity before/after.
2. With the fine-tuned weights frozen, only the initial WKV state is tuned (`--state-minutes`) on the same
   training dialogues: held-out answers then get a higher likelihood from that state than from the zero state
   a plain session starts from. Perplexity counts the assistant tokens only, each dialogue from the initial
   state exactly as a new session would run it (tuning.evaluate).
Writes the run to `--out`, the numbers to `--json` (docs/tuning_demo.json) and prints a table.
"""
from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from tuning.data import TokenDataset, pydoc_dialogues, tokenize_dialogues
from tuning.evaluate import bleu, perplexity
from tuning.train import TrainConfig, Trainer
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5
from worker.state import load_time_state
from worker.tokenizer import WorldTokenizer


def held_out_topic_split(val_fraction: float, seed: int, tokenizer) -> tuple[TokenDataset, TokenDataset, list[str]]:
    """(train, val, val topic names): val holds whole pydoc topics, minus answers also found in a training topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    val_topics = sorted(random.Random(seed).sample(names, max(1, round(len(names) * val_fraction))))
    train_dialogues = list(pydoc_dialogues(seed=seed, topics=set(names) - set(val_topics)))
    seen = {d[-1].text for d in train_dialogues}
    val_dialogues = [d for d in pydoc_dialogues(seed=seed, topics=set(val_topics)) if d[-1].text not in seen]
    meta = {"source": "pydoc", "split": "held-out topics", "val_topics": val_topics}
    return (tokenize_dialogues(train_dialogues, tokenizer, "chat", meta=meta),
            tokenize_dialogues(val_dialogues, tokenizer, "chat", meta=meta), val_topics)


def timed_fit(trainer: Trainer, minutes: float, steps: int = 0, calibration_steps: int = 5) -> dict:
    """Train for `steps`, or (steps 0) for about `minutes`: time a few warmup steps, then size the schedule."""
    start = time.perf_counter()
    if steps:
        trainer.cfg.steps = steps
        done = trainer.fit()
    else:
        done = trainer.fit(calibration_steps, progress=False)
        per_step = (time.perf_counter() - start) / max(1, len(done))
        left = minutes * 60 - (time.perf_counter() - start)
        # The schedule reads cfg.steps when it computes each step's factor, so resizing it now (still inside
        # the warmup, whose factors do not depend on the total) gives the schedule of knowing the total up front.
        trainer.cfg.steps = trainer.step + max(1, int(left / per_step))
        done += trainer.fit(time_limit_s=left)
    elapsed = time.perf_counter() - start
    tokens = sum(r.tokens for r in done)
    mean = lambda rs: round(sum(r.loss for r in rs) / len(rs), 4)  # noqa: E731 - one batch is too noisy alone
    return {"steps": trainer.step, "seconds": round(elapsed, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1), "train_loss_first5": mean(done[:5]),
            "train_loss_last5": mean(done[-5:])}


def main(
    minutes: float = typer.Option(3.0, help="Full fine-tuning time budget."),
    state_minutes: float = typer.Option(1.5, help="State tuning time budget."),
    steps: int = typer.Option(0, help="Full fine-tuning steps instead of a time budget (reproducible numbers)."),
    state_steps: int = typer.Option(0, help="State tuning steps instead of a time budget."),
    n_layer: int = typer.Option(4, help="Layers of the random-init model."),
    n_embd: int = typer.Option(256, help="Width of the random-init model (a multiple of 64)."),
    lr: float = typer.Option(2e-3, help="Full fine-tuning peak learning rate (a random-init model learns fast)."),
    state_lr: float = typer.Option(1.0, help="State tuning peak learning rate (RWKV-PEFT uses 1)."),
    batch_size: int = typer.Option(4, help="Dialogues per step."),
    ctx_len: int = typer.Option(256, help="Training window: the longest pydoc dialogue is ~210 tokens."),
    bleu_limit: int = typer.Option(40, help="Held-out replies generated for BLEU (0: none)."),
    seed: int = typer.Option(0, help="Seed of the model, the topic split and the data order."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)."),
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (data, checkpoints, state)."),
    json_out: Path = typer.Option(Path("docs/tuning_demo.json"), "--json", help="Where the numbers go."),
) -> None:
    """Fine-tune and state-tune a small RWKV-5 on pydoc dialogues; report held-out perplexity and BLEU."""
    console = Console()
    if threads:
        torch.set_num_threads(threads)
    tokenizer = WorldTokenizer()
    train, val, val_topics = held_out_topic_split(0.15, seed, tokenizer)
    train.save(out / "data/train.pt")
    val.save(out / "data/val.pt")
    console.print(f"pydoc dialogues: train {len(train)} ({train.num_tokens:,} tokens), val {len(val)} "
                  f"({val.num_tokens:,} tokens, {val.num_trainable:,} assistant) on {len(val_topics)} held-out topics")
    base = make_random_checkpoint(out / "base.pth", n_layer=n_layer, n_embd=n_embd, seed=seed)

    def measure(model: RWKV5, state_file: Path | None = None) -> dict:
        c = model.config
        init = load_time_state(state_file, c.n_layer, c.n_head, c.head_size, c.n_embd) if state_file else None
        p = perplexity(model, val, init, ctx_len=ctx_len)
        row = {"ppl": round(p.ppl, 3), "loss": round(p.loss, 4), "tokens": p.tokens}
        if bleu_limit:
            row["bleu"] = round(bleu(model, tokenizer, val, init, limit=bleu_limit, max_new_tokens=48)["bleu"], 2)
        return row

    results: dict = {"base (random init), zero state": measure(RWKV5.from_checkpoint(base))}
    common = dict(data=out / "data/train.pt", ctx_len=ctx_len, batch_size=batch_size, windows="document",
                  warmup=10, seed=seed)
    full = Trainer(TrainConfig(model=base, out=out / "full", mode="full", lr=lr, steps=10_000, **common))
    console.print(f"full fine-tuning L{n_layer} D{n_embd} for {f'{steps} steps' if steps else f'{minutes:g} min'} ...")
    full_run = timed_fit(full, minutes, steps)
    tuned_model = full.export()
    full.save_checkpoint()
    del full
    finetuned = RWKV5.from_checkpoint(tuned_model)
    results["fine-tuned, zero state"] = measure(finetuned)

    state = Trainer(TrainConfig(model=tuned_model, out=out / "state", mode="state", lr=state_lr, steps=10_000,
                                **common))
    budget = f"{state_steps} steps" if state_steps else f"{state_minutes:g} min"
    console.print(f"state tuning on the frozen fine-tuned model for {budget} ...")
    state_run = timed_fit(state, state_minutes, state_steps)
    state_file = state.export()
    state.save_checkpoint()
    results["fine-tuned, tuned state (preset)"] = measure(finetuned, state_file)

    table = Table(title=f"held-out pydoc topics: {len(val)} dialogues, {val.num_trainable:,} assistant tokens")
    for col in ("model / initial state", "val ppl", "loss (nats)", "BLEU"):
        table.add_column(col, justify="left" if col.startswith("model") else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['ppl']:,.2f}", f"{r['loss']:.4f}", f"{r['bleu']:.2f}" if "bleu" in r else "-")
    console.print(table)
    for name, run in (("full fine-tuning", full_run), ("state tuning", state_run)):
        console.print(f"{name}: {run['steps']} steps in {run['seconds']:.0f} s, {run['tokens_per_s']:,.0f} tok/s, "
                      f"train loss {run['train_loss_first5']:.3f} -> {run['train_loss_last5']:.3f} "
                      "(first/last 5 steps)")
    report = {
        "command": " ".join(["python -m tuning.demo", f"--steps {steps}" if steps else f"--minutes {minutes:g}",
                             f"--state-steps {state_steps}" if state_steps else f"--state-minutes {state_minutes:g}",
                             *([f"--threads {threads}"] if threads else [])]),
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": {"n_layer": n_layer, "n_embd": n_embd, "vocab": 65536, "init": "random", "seed": seed},
        "data": {"train_dialogues": len(train), "train_tokens": train.num_tokens, "val_dialogues": len(val),
                 "val_assistant_tokens": val.num_trainable, "val_topics": val_topics, "template": "chat"},
        "perplexity_counts": "assistant tokens, each held-out dialogue from the initial state (as a new session)",
        "bleu": f"sacrebleu corpus BLEU of greedy replies (48 tokens max) to the first {bleu_limit} held-out questions",
        "full_finetune": {"lr": lr, "batch_size": batch_size, "ctx_len": ctx_len, **full_run},
        "state_tune": {"lr": state_lr, "batch_size": batch_size, "ctx_len": ctx_len, **state_run},
        "results": results,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {json_out}; model {tuned_model}, preset state {state_file}")


if __name__ == "__main__":
    typer.run(main)
