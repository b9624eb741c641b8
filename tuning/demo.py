"""Offline CPU demo: fine-tune a small RWKV-5 on Python's own documentation, then compare full fine-tuning, LoRA
and state tuning from the same model, on the same data, for the same number of steps.

Data that ships with every Python: `pydoc_data.topics` -> question/answer dialogues (tuning.data) -> tokens.
Whole topics are held out for validation, and a held-out answer that also appears under a training topic (some
sections are shared between topics) is dropped, so validation measures answers about unseen topics.
0. A random-init model (World vocab) is fully fine-tuned for `--minutes` (or `--steps`): there is no pretrained
   RWKV offline, so this "domain model" stands in for the released model one would start from.
1. From the domain model, each of `--methods` (full fine-tuning, LoRA / PiSSA adapters on the frozen weights,
   state tuning of the initial WKV state) trains `--method-steps` steps on the same batches. Each result is
   written as a service would load it (model.pth, the merged adapter, a state preset) and judged from that file:
   held-out perplexity (assistant tokens, each dialogue from the initial state as a new session runs it) and
   BLEU of greedy replies; with tokens/s and the peak tensor memory of a training step (tuning.memtrack).
Writes the runs to `--out`, the numbers to `--json` (docs/tuning_demo.json), the loss curves to `--curves`
(docs/tuning_curves.png) and prints the table.
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

from tuning.curves import plot_curves
from tuning.data import TokenDataset, pydoc_dialogues, tokenize_dialogues
from tuning.evaluate import bleu, perplexity
from tuning.memory_plan import measured_peak
from tuning.train import TrainConfig, Trainer
from worker.checkpoint import make_random_checkpoint
from worker.model import RWKV5
from worker.state import load_time_state
from worker.tokenizer import WorldTokenizer

METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "pissa": "PiSSA", "state": "state tuning"}


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
    """Train for `steps`, or (steps 0) for about `minutes`: time a few warmup steps, then size the schedule.
    Validates before and after (and every cfg.eval_every steps), for the curves."""
    trainer.validate()
    start = time.perf_counter()
    if steps:
        trainer.cfg.steps = steps
        done = trainer.fit(progress=False)
    else:
        done = trainer.fit(calibration_steps, progress=False)
        per_step = (time.perf_counter() - start) / max(1, len(done))
        left = minutes * 60 - (time.perf_counter() - start)
        # The schedule reads cfg.steps when it computes each step's factor, so resizing it now (still inside
        # the warmup, whose factors do not depend on the total) gives the schedule of knowing the total up front.
        trainer.cfg.steps = trainer.step + max(1, int(left / per_step))
        done += trainer.fit(time_limit_s=left, progress=False)
    elapsed = time.perf_counter() - start
    trainer.validate()
    tokens = sum(r.tokens for r in done)
    mean = lambda rs: round(sum(r.loss for r in rs) / len(rs), 4)  # noqa: E731 - one batch is too noisy alone
    peak = measured_peak(trainer)  # one more forward + backward, not a step: the result stays as trained
    return {"steps": trainer.step, "seconds": round(elapsed, 1), "tokens": tokens,
            "tokens_per_s": round(tokens / elapsed, 1), "train_loss_first5": mean(done[:5]),
            "train_loss_last5": mean(done[-5:]), "trained_parameters": sum(p.numel() for p in trainer.trainable),
            "peak_tensor_bytes": peak["peak"], "losses": [round(x, 4) for x in trainer.losses],
            "evals": [{"step": e["step"], "loss": round(e["loss"], 4), "ppl": round(e["ppl"], 3)}
                      for e in trainer.evals]}


def main(
    minutes: float = typer.Option(3.0, help="Time budget of the domain model's full fine-tuning (phase 0)."),
    steps: int = typer.Option(0, help="Phase 0 steps instead of a time budget (reproducible numbers)."),
    method_steps: int = typer.Option(30, help="Steps of each method compared in phase 1 (the same for all)."),
    methods: str = typer.Option("full,lora,state", help="Methods compared: full, lora, pissa, state."),
    n_layer: int = typer.Option(4, help="Layers of the random-init model."),
    n_embd: int = typer.Option(256, help="Width of the random-init model (a multiple of 64)."),
    lr: float = typer.Option(2e-3, help="Phase 0 peak learning rate (a random-init model learns fast)."),
    full_lr: float = typer.Option(5e-4, help="Phase 1 full fine-tuning peak learning rate."),
    lora_lr: float = typer.Option(5e-3, help="Phase 1 LoRA / PiSSA peak learning rate."),
    lora_rank: int = typer.Option(16, help="Adapter rank."),
    lora_alpha: float = typer.Option(32.0, help="Adapter alpha (scale alpha / rank)."),
    state_lr: float = typer.Option(1.0, help="Phase 1 state tuning peak learning rate (RWKV-PEFT uses 1)."),
    batch_size: int = typer.Option(4, help="Dialogues per step."),
    ctx_len: int = typer.Option(256, help="Training window: the longest pydoc dialogue is ~210 tokens."),
    eval_every: int = typer.Option(10, help="Held-out loss every N steps, for the curves."),
    bleu_limit: int = typer.Option(40, help="Held-out replies generated for BLEU (0: none)."),
    seed: int = typer.Option(0, help="Seed of the model, the topic split and the data order."),
    threads: int = typer.Option(0, help="torch intra-op threads (0: torch's default)."),
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (data, checkpoints, adapters, state)."),
    json_out: Path = typer.Option(Path("docs/tuning_demo.json"), "--json", help="Where the numbers go."),
    curves: Path = typer.Option(Path("docs/tuning_curves.png"), help="Where the loss curves go (PNG)."),
) -> None:
    """Fine-tune a small RWKV-5 on pydoc dialogues, then compare full / LoRA / state tuning from it."""
    console = Console()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or any(m not in METHOD_NAMES for m in chosen):
        raise typer.BadParameter(f"--methods: a comma list of {', '.join(METHOD_NAMES)}")
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

    common = dict(data=out / "data/train.pt", val=out / "data/val.pt", ctx_len=ctx_len, batch_size=batch_size,
                  windows="document", warmup=10, seed=seed, eval_every=eval_every)
    results: dict = {"base (random init)": measure(RWKV5.from_checkpoint(base))}
    domain = Trainer(TrainConfig(model=base, out=out / "domain", mode="full", lr=lr, steps=10_000, **common))
    console.print(f"phase 0: full fine-tuning L{n_layer} D{n_embd} from random init for "
                  f"{f'{steps} steps' if steps else f'{minutes:g} min'} ...")
    runs = {"phase 0: full fine-tuning": timed_fit(domain, minutes, steps)}
    domain_file = domain.export()
    del domain
    domain_model = RWKV5.from_checkpoint(domain_file)
    results["domain model (phase 0)"] = measure(domain_model)

    lrs = {"full": full_lr, "lora": lora_lr, "pissa": lora_lr, "state": state_lr}
    for method in chosen:
        trainer = Trainer(TrainConfig(model=domain_file, out=out / method, mode=method, lr=lrs[method],
                                      steps=method_steps, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                      **{**common, "warmup": min(10, max(1, method_steps // 4))}))
        console.print(f"phase 1: {METHOD_NAMES[method]} from the domain model, {method_steps} steps ...")
        runs[method] = timed_fit(trainer, 0, method_steps)
        runs[method]["lr"] = lrs[method]
        exported = trainer.export()  # model.pth (merged, for adapters) or state.pth
        del trainer
        if method == "state":
            results[f"{method}: domain model + tuned state"] = measure(domain_model, exported)
        else:
            results[f"{method}: {exported.relative_to(out)}"] = measure(RWKV5.from_checkpoint(exported))

    domain_row = results["domain model (phase 0)"]
    table = Table(title=f"held-out pydoc topics: {len(val)} dialogues, {val.num_trainable:,} assistant tokens; "
                        f"phase 1: {method_steps} steps each from the domain model")
    for col in ("run", "trained params", "steps", "val ppl before", "val ppl after", "BLEU after", "tok/s",
                "peak MiB"):
        table.add_column(col, justify="left" if col == "run" else "right")
    rows = [("phase 0: full fine-tuning", runs["phase 0: full fine-tuning"], results["base (random init)"],
             domain_row)]
    rows += [(METHOD_NAMES[m], runs[m], domain_row, r) for m, (_, r) in zip(chosen, list(results.items())[2:])]
    for name, run, before, after in rows:
        table.add_row(name, f"{run['trained_parameters']:,}", str(run["steps"]), f"{before['ppl']:,.2f}",
                      f"{after['ppl']:,.2f}", f"{after['bleu']:.2f}" if "bleu" in after else "-",
                      f"{run['tokens_per_s']:,.0f}", f"{run['peak_tensor_bytes'] / 2**20:,.0f}")
    console.print(table)
    plot_curves([("phase 0: full fine-tuning from random init",
                  {"full": runs["phase 0: full fine-tuning"]}),
                 (f"phase 1: {method_steps} steps from the domain model", {METHOD_NAMES[m]: runs[m] for m in chosen})],
                curves)
    command = ["python -m tuning.demo", f"--steps {steps}" if steps else f"--minutes {minutes:g}",
               f"--method-steps {method_steps}", f"--methods {','.join(chosen)}",
               *([f"--threads {threads}"] if threads else [])]
    report = {
        "command": " ".join(command),
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "model": {"n_layer": n_layer, "n_embd": n_embd, "vocab": 65536, "init": "random", "seed": seed},
        "data": {"train_dialogues": len(train), "train_tokens": train.num_tokens, "val_dialogues": len(val),
                 "val_assistant_tokens": val.num_trainable, "val_topics": val_topics, "template": "chat"},
        "perplexity_counts": "assistant tokens, each held-out dialogue from the initial state (as a new session)",
        "bleu": f"sacrebleu corpus BLEU of greedy replies (48 tokens max) to the first {bleu_limit} held-out questions",
        "peak_tensor_bytes": "weights + trained tensors + optimizer states + the tracked peak of one forward/backward "
                             "(tuning.memtrack, real CPU tensors)",
        "settings": {"phase0_lr": lr, "batch_size": batch_size, "ctx_len": ctx_len, "lora_rank": lora_rank,
                     "lora_alpha": lora_alpha, "lrs": {m: lrs[m] for m in chosen}},
        "runs": runs,
        "results": results,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {json_out} and {curves}; runs in {out}")


if __name__ == "__main__":
    typer.run(main)
