"""`python -m tuning.train`: full fine-tuning, LoRA / PiSSA adapters or state tuning of an RWKV-5.2 checkpoint.

The run itself is tuning.trainer (what each mode trains and writes); the loop's pieces are tuning.loop; the
adapters are tuning.lora. This module is the command line, and re-exports the names older code imports from here.
"""
from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from tuning.frozen import DTYPES
from tuning.loop import IGNORE, document_windows, lr_factor, masked_loss
from tuning.trainer import CHECKPOINT_FORMAT, DEFAULT_LR, MODES, StepResult, TrainConfig, Trainer

__all__ = ["CHECKPOINT_FORMAT", "DEFAULT_LR", "IGNORE", "StepResult", "TrainConfig", "Trainer", "document_windows",
           "lr_factor", "masked_loss", "app"]

# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    model: Path = typer.Option(..., help="Base checkpoint (official RWKV-5.2 .pth)."),
    data: Path = typer.Option(..., help="Training TokenDataset (.pt, from python -m tuning.prepare)."),
    out: Path = typer.Option(..., help="Run folder: model.pth (+ adapter.pt) or state.pth, last.pt, log.json."),
    val: Path | None = typer.Option(None, help="Validation TokenDataset: perplexity before and after."),
    mode: str = typer.Option("full", help="full (all weights), lora, pissa (adapters) or state (initial WKV state)."),
    ctx_len: int = typer.Option(128, help="Tokens per training window."),
    batch_size: int = typer.Option(4, help="Windows per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: 1e-4 full, 2e-4 lora/pissa, 1.0 state)."),
    min_lr_ratio: float = typer.Option(0.1, help="Final learning rate as a fraction of the peak."),
    warmup: int = typer.Option(10, help="Linear warmup steps."),
    steps: int = typer.Option(100, help="Total optimizer steps (the schedule's length)."),
    stop_after: int | None = typer.Option(None, help="Stop at this step (resume later to finish the schedule)."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm (0: off)."),
    weight_decay: float = typer.Option(0.01, help="AdamW weight decay on 2-D weights (full mode)."),
    windows: str = typer.Option("random", help="random (offsets in the text) or document (dialogue starts)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute blocks in backward."),
    seed: int = typer.Option(0, help="Seed of the data order."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast for full mode on CUDA), fp32 or bf16."),
    eval_every: int = typer.Option(0, help="Validate every N steps (0: before and after only)."),
    save_every: int = typer.Option(0, help="Write last.pt every N steps (0: at the end)."),
    save_dtype: str = typer.Option("same", help="model.pth dtype (same as the base, fp32, bf16, fp16)."),
    base_dtype: str = typer.Option(
        "auto", help="Frozen weights (lora/pissa/state): auto (bf16 on CUDA), fp32, bf16 or fp16."),
    lora_rank: int = typer.Option(16, help="Adapter rank r."),
    lora_alpha: float = typer.Option(32.0, help="Adapter scale alpha (the update is scaled by alpha / r)."),
    lora_targets: str = typer.Option("all", help="all, att, ffn or a comma list, e.g. att.key,att.value,ffn.key."),
    pissa_niter: int = typer.Option(0, help="PiSSA SVD: 0 exact, N > 0 randomized with N subspace iterations."),
    resume: Path | None = typer.Option(None, help="Continue from a last.pt of the same run."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Fine-tune (full, lora, pissa) or state-tune (state) an RWKV-5.2 model on a token dataset."""
    console = Console()
    choices = {"mode": (mode, MODES), "windows": (windows, ("random", "document")),
               "precision": (precision, ("auto", "fp32", "bf16")), "save-dtype": (save_dtype, ("same", *DTYPES)),
               "base-dtype": (base_dtype, ("auto", *DTYPES))}
    for option, (value, allowed) in choices.items():
        if value not in allowed:
            raise typer.BadParameter(f"--{option} must be one of {', '.join(allowed)}, not {value!r}")
    # The literals were checked above; typer has no Literal options, hence the str -> Literal ignores.
    cfg = TrainConfig(model=model, data=data, out=out, val=val, mode=mode,  # type: ignore[arg-type]
                      ctx_len=ctx_len, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup,
                      steps=steps, grad_clip=grad_clip, weight_decay=weight_decay,
                      windows=windows,  # type: ignore[arg-type]
                      grad_checkpoint=grad_checkpoint, seed=seed, device=device,
                      precision=precision,  # type: ignore[arg-type]
                      eval_every=eval_every, save_every=save_every,
                      save_dtype=save_dtype,  # type: ignore[arg-type]
                      base_dtype=base_dtype,  # type: ignore[arg-type]
                      lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets, pissa_niter=pissa_niter)
    try:
        trainer = Trainer(cfg)
    except ValueError as e:  # e.g. an unknown --lora-targets entry
        raise typer.BadParameter(str(e)) from e
    if resume is not None:
        trainer.load_checkpoint(resume)
        console.print(f"resumed {resume} at step {trainer.step}")
    c = trainer.model.config
    console.print(f"{mode} tuning L{c.n_layer} D{c.n_embd} on {trainer.train_ds.num_tokens:,} tokens "
                  f"({trainer.train_ds.num_trainable:,} trained), lr {cfg.learning_rate:g}, {cfg.steps} steps")
    before = trainer.validate() if trainer.step == 0 else None
    trainer.fit(stop_after)
    after = trainer.validate()
    exported = trainer.export()
    last = trainer.save_checkpoint()
    trainer.write_log({"tokens_per_s": trainer.tokens_per_s})
    if before is not None:
        console.print(f"val ppl before {before.ppl:.3f}")
    if after is not None:
        console.print(f"val ppl after  {after.ppl:.3f} ({after.tokens:,} assistant tokens)")
    adapter = f", {exported.with_name('adapter.pt')}" if trainer.adapters is not None else ""
    console.print(f"step {trainer.step}/{cfg.steps}, {trainer.tokens_per_s:,.0f} tok/s; "
                  f"wrote {exported}{adapter} and {last}")


if __name__ == "__main__":
    app()
