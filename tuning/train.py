"""Full fine-tuning and state tuning of RWKV-5.2 on the serving model code, with resumable checkpoints.

full   every weight trains (AdamW, weight decay on 2-D weights only); the result is an official-format `.pth`
       that the reference `rwkv` package and this service load like any released model.
state  only the initial WKV state of each layer trains (weights frozen): the result is a small `.pth` of
       `blocks.N.att.time_state` [H, N_v, N_k], as RWKV-LM / RWKV-PEFT save it, served as a session preset.

Schedule: linear warmup, then cosine decay to `min_lr_ratio` x lr at `steps`. Loss: cross-entropy on the
loss-masked (assistant) targets, divided by their count. bf16 autocast on CUDA, fp32 on CPU.
`last.pt` holds everything needed to continue the very same run (weights or state, optimizer, scheduler,
step, RNG states, data position): resuming from it reproduces the losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuning.data import Batch, TokenDataset
from tuning.evaluate import Perplexity, perplexity
from worker.model import RWKV5, read_checkpoint
from worker.state import State, time_state_to_dict

Mode = Literal["full", "state"]
Windows = Literal["random", "document"]
# State tuning takes far larger steps than weights: RWKV-PEFT uses lr 1 for it, and on the demo's model lr 1e-2
# moved held-out perplexity by 0.01% in 40 steps where lr 1 moved it by 1.3% (docs/tuning.md).
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "state": 1.0}
CHECKPOINT_FORMAT = "rwkv-serve-train-checkpoint"
IGNORE = -100  # target of a padded position (F.cross_entropy's ignore_index): no loss, not counted as a token
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """One training run's settings (the CLI's options)."""

    model: Path  # the base checkpoint (official .pth)
    data: Path  # training TokenDataset (.pt)
    out: Path  # run folder: model.pth or state.pth, last.pt, log.json
    val: Path | None = None  # validation TokenDataset: perplexity before and after (and every eval_every steps)
    mode: Mode = "full"
    ctx_len: int = 128  # tokens per training window
    batch_size: int = 4
    lr: float | None = None  # None: DEFAULT_LR[mode]
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 10  # steps of linear warmup from lr / warmup
    steps: int = 100  # total steps of the schedule
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    weight_decay: float = 0.01  # full mode, 2-D weights only (not norms, mixes, decays or the state)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    # random: windows at random offsets of the concatenated text, starting from the initial state (RWKV-LM);
    # document: each sample is one dialogue from its beginning, padded, as a session sees it (state tuning).
    windows: Windows = "random"
    grad_checkpoint: bool = False  # recompute each block in backward: less activation memory, ~30% slower
    seed: int = 0
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    eval_every: int = 0  # 0: validation only before and after
    save_every: int = 0  # 0: last.pt only at the end
    save_dtype: Literal["same", "fp32", "bf16", "fp16"] = "same"  # full mode: dtype of model.pth

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]


@dataclass
class StepResult:
    """What one optimizer step did."""

    step: int  # steps done after this one
    loss: float  # masked cross-entropy of the batch
    tokens: int  # input tokens processed (padding excluded)
    targets: int  # targets in the loss
    lr: float  # learning rate used for this step
    grad_norm: float  # before clipping


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the masked targets (0 when there are none). logits (B, T, V); target, mask (B, T)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
    m = mask.flatten().to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1), int(m.sum())


def document_windows(ds: TokenDataset, ctx_len: int, batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Batches of whole dialogues from their first token, in a new shuffled order each epoch; (input, target, mask).

    A dialogue longer than ctx_len + 1 tokens is cut to its first ctx_len + 1; shorter ones are padded at the end,
    to the batch's longest, with input 0, target IGNORE and mask 0 (padding at the end never changes the causal
    model's outputs at real positions)."""
    n_docs = len(ds)
    if n_docs == 0:
        raise ValueError("the dataset has no dialogues")
    epoch = 0
    while True:
        order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        for s in range(0, n_docs - batch_size + 1, batch_size):  # full batches only: every step weighs the same
            docs = [ds.document(i) for i in order[s : s + batch_size]]
            width = min(ctx_len + 1, max(len(t) for t, _ in docs))
            tokens = torch.full((batch_size, width), IGNORE, dtype=torch.long)
            mask = torch.zeros(batch_size, width, dtype=torch.uint8)
            for r, (t, m) in enumerate(docs):
                t, m = t[:width], m[:width]
                tokens[r, : len(t)], mask[r, : len(m)] = t.long(), m
            yield tokens[:, :-1].clamp(min=0), tokens[:, 1:], mask[:, 1:]
        epoch += 1


class Trainer:
    """A training run: the model, what trains, the optimizer and schedule, the data stream and the step count."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # The original file's key order and dtypes: the reference package detects v5.2 by key order, and an
        # official checkpoint is 16-bit, so the fine-tuned file is written back the way it came.
        source = read_checkpoint(cfg.model)
        self.key_order = list(source)
        self.source_dtypes = {k: v.dtype for k, v in source.items()}
        del source
        self.model = RWKV5.from_checkpoint(cfg.model, device=self.device, trainable=True)
        self.model.grad_checkpoint = cfg.grad_checkpoint
        c = self.model.config
        self.train_ds = TokenDataset.load(cfg.data)
        self.val_ds = TokenDataset.load(cfg.val) if cfg.val else None
        self.time_state: torch.Tensor | None = None
        if cfg.mode == "full":
            named = list(self.model.params.items())
            for _, p in named:
                p.requires_grad_(True)
            # Decay only matrices (embedding, head, projections): norms, mixes, decay rates and bonuses are
            # per-channel parameters that weight decay would pull toward meaningless zeros.
            decay = [p for n, p in named if n.endswith(".weight") and p.dim() == 2]
            rest = [p for n, p in named if not (n.endswith(".weight") and p.dim() == 2)]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
            self.trainable = [p for _, p in named]
        elif cfg.mode == "state":
            # [key, value] layout, as the model's WKV state; saved transposed ([value, key]) like RWKV-PEFT.
            self.time_state = torch.zeros(c.n_layer, c.n_head, c.head_size, c.head_size, device=self.device,
                                          requires_grad=True)
            groups = [{"params": [self.time_state], "weight_decay": 0.0}]
            self.trainable = [self.time_state]
        else:
            raise ValueError(f"mode must be 'full' or 'state', got {cfg.mode!r}")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr_ratio))
        self.step = 0
        self.losses: list[float] = []  # one per step since the run began (resumes included)
        self.evals: list[dict[str, Any]] = []  # validation results by step
        self._batches = self._batch_stream()

    # ---- data --------------------------------------------------------------------------------------------

    def _batch_stream(self, skip: int = 0) -> Iterator[Batch]:
        """The run's batches from the start, with the first `skip` replayed and dropped (the data position)."""
        cfg = self.cfg
        if cfg.windows == "document":
            stream = document_windows(self.train_ds, cfg.ctx_len, cfg.batch_size, cfg.seed)
        else:
            stream = self.train_ds.batches(cfg.ctx_len, cfg.batch_size, seed=cfg.seed)
        for _ in range(skip):  # cheap: drawing a batch is a few index operations, no model work
            next(stream)
        return stream

    # ---- the step ----------------------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast where asked (auto: on CUDA); fp32 master weights and an fp32 WKV state either way."""
        bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def initial_state(self, batch_size: int) -> State:
        """Zeros, or (state mode) the trained WKV state for every row with zero shift vectors."""
        state = self.model.init_state(batch_size)
        if self.time_state is not None:
            state.wkv = self.time_state.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (L, B, H, N, N)
        return state

    def train_step(self) -> StepResult:
        """One batch: forward, masked loss, backward, clip, AdamW, schedule."""
        x, y, m = (t.to(self.device) for t in next(self._batches))
        lr = self.optimizer.param_groups[0]["lr"]
        with self.autocast():
            logits, _ = self.model.forward(x, self.initial_state(x.shape[0]), all_logits=True)
        loss, targets = masked_loss(logits, y, m)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        tokens = int((y != IGNORE).sum())  # padding excluded from tokens/s
        return StepResult(self.step, value, tokens, targets, lr, grad_norm)

    def fit(self, until: int | None = None, *, time_limit_s: float | None = None, progress: bool = True,
            console: Console | None = None) -> list[StepResult]:
        """Train up to step `until` (default: cfg.steps) or for `time_limit_s`; evaluates and saves as configured."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        results: list[StepResult] = []
        start, tokens = time.perf_counter(), 0
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TextColumn("lr {task.fields[lr]:.2e}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task(f"{cfg.mode} tuning", total=until, completed=self.step, loss=math.nan, tps=0.0,
                                lr=self.optimizer.param_groups[0]["lr"])
            while self.step < until:
                r = self.train_step()
                results.append(r)
                tokens += r.tokens
                bar.update(task, completed=self.step, loss=r.loss, tps=tokens / (time.perf_counter() - start),
                           lr=r.lr)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < until:
                    self.validate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < until:
                    self.save_checkpoint(cfg.out / "last.pt")
                if time_limit_s is not None and time.perf_counter() - start >= time_limit_s:
                    break
        self.tokens_per_s = tokens / max(time.perf_counter() - start, 1e-9)
        return results

    def validate(self) -> Perplexity | None:
        """Perplexity of the validation set from the current initial state (None without one)."""
        if self.val_ds is None:
            return None
        init = None
        if self.time_state is not None:
            init = State(*(t.detach() for t in self.initial_state(1).tensors()))
        with self.autocast():
            p = perplexity(self.model, self.val_ds, init, ctx_len=max(self.cfg.ctx_len, 256))
        self.evals.append({"step": self.step, "ppl": p.ppl, "loss": p.loss, "tokens": p.tokens})
        return p

    # ---- files -------------------------------------------------------------------------------------------

    def export(self, path: Path | None = None) -> Path:
        """Write the result: the fine-tuned model (official .pth) or the tuned state (time_state .pth)."""
        if self.time_state is not None:
            path = path or self.cfg.out / "state.pth"
            shift = torch.zeros(self.model.config.n_layer, 1, self.model.config.n_embd)
            sd = time_state_to_dict(State(shift, self.time_state.detach().cpu().unsqueeze(1), shift))
        else:
            path = path or self.cfg.out / "model.pth"
            params = self.model.state_dict()
            sd = {k: params[k].cpu().to(self._save_dtype(k)).contiguous() for k in self.key_order}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, str(path))
        return path

    def _save_dtype(self, key: str) -> torch.dtype:
        return self.source_dtypes[key] if self.cfg.save_dtype == "same" else _DTYPES[self.cfg.save_dtype]

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Everything needed to continue this run exactly: trained tensors, optimizer, schedule, step, RNG, data."""
        path = path or self.cfg.out / "last.pt"
        trained = ({"time_state": self.time_state.detach().cpu()} if self.time_state is not None
                   else {k: v.detach().cpu() for k, v in self.model.params.items()})
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": 1, "mode": self.cfg.mode, "step": self.step,
            "trained": trained, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "batches_consumed": self.step,  # the data position: one batch per step, replayed from the seed
            "losses": self.losses, "evals": self.evals,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, str(tmp))
        tmp.replace(path)  # a crash while saving never leaves a half-written last.pt
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from a `save_checkpoint` file of a run with the same mode, model shapes and data."""
        # weights_only=False: the file holds Python RNG state tuples; it is our own file, not a download.
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a training checkpoint of this trainer")
        if ckpt["mode"] != self.cfg.mode:
            raise ValueError(f"{path} is a {ckpt['mode']} tuning checkpoint; this run is {self.cfg.mode} tuning")
        with torch.no_grad():
            if self.time_state is not None:
                self.time_state.copy_(ckpt["trained"]["time_state"])
            else:
                missing = set(self.model.params) ^ set(ckpt["trained"])
                if missing:
                    raise ValueError(f"{path} does not match the model (differing keys {sorted(missing)[:3]})")
                for k, v in ckpt["trained"].items():
                    self.model.params[k].copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.losses, self.evals = ckpt["step"], list(ckpt["losses"]), list(ckpt["evals"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._batches = self._batch_stream(skip=ckpt["batches_consumed"])

    def write_log(self, extra: dict[str, Any] | None = None) -> Path:
        """log.json: the configuration, per-step losses and validation results."""
        path = self.cfg.out / "log.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        log = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()},
               "step": self.step, "losses": self.losses, "evals": self.evals, **(extra or {})}
        path.write_text(json.dumps(log, indent=1) + "\n")
        return path


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    model: Path = typer.Option(..., help="Base checkpoint (official RWKV-5.2 .pth)."),
    data: Path = typer.Option(..., help="Training TokenDataset (.pt, from python -m tuning.prepare)."),
    out: Path = typer.Option(..., help="Run folder: model.pth or state.pth, last.pt, log.json."),
    val: Path | None = typer.Option(None, help="Validation TokenDataset: perplexity before and after."),
    mode: str = typer.Option("full", help="full (all weights) or state (initial WKV state only)."),
    ctx_len: int = typer.Option(128, help="Tokens per training window."),
    batch_size: int = typer.Option(4, help="Windows per step."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: 1e-4 full, 1.0 state, as RWKV-PEFT)."),
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
    precision: str = typer.Option("auto", help="auto (bf16 autocast on CUDA), fp32 or bf16."),
    eval_every: int = typer.Option(0, help="Validate every N steps (0: before and after only)."),
    save_every: int = typer.Option(0, help="Write last.pt every N steps (0: at the end)."),
    save_dtype: str = typer.Option("same", help="Full mode: model.pth dtype (same as the base, fp32, bf16, fp16)."),
    resume: Path | None = typer.Option(None, help="Continue from a last.pt of the same run."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Fine-tune (full) or state-tune (state) an RWKV-5.2 model on a token dataset."""
    console = Console()
    choices = {"mode": (mode, ("full", "state")), "windows": (windows, ("random", "document")),
               "precision": (precision, ("auto", "fp32", "bf16")), "save-dtype": (save_dtype, ("same", *_DTYPES))}
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
                      save_dtype=save_dtype)  # type: ignore[arg-type]
    trainer = Trainer(cfg)
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
    console.print(f"step {trainer.step}/{cfg.steps}, {trainer.tokens_per_s:,.0f} tok/s; wrote {exported} and {last}")


if __name__ == "__main__":
    app()
