"""A training run on the serving model code: full fine-tuning, LoRA / PiSSA adapters or state tuning, resumable.

full   every weight trains: fp32 master weights, AdamW (weight decay on 2-D weights only); the result is an
       official-format `.pth` that the reference `rwkv` package and this service load like any released model.
lora   low-rank adapters on the blocks' projections (tuning.lora); the weights stay frozen in `base_dtype`
pissa  (bf16 on CUDA). The result: the adapter alone (`adapter.pt`) and the merged official `.pth`.
state  only the initial WKV state of each layer trains (weights frozen in `base_dtype`): a small `.pth` of
       `blocks.N.att.time_state` [H, N_v, N_k], as RWKV-LM / RWKV-PEFT save it, served as a session preset.

Schedule: linear warmup, then cosine decay to `min_lr_ratio` x lr at `steps`. Loss: cross-entropy on the
loss-masked (assistant) targets, divided by their count. `last.pt` holds everything needed to continue the very
same run (trained tensors, optimizer, scheduler, step, RNG states, data position): resuming from it reproduces the
losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tuning import lora
from tuning.data import Batch, TokenDataset
from tuning.evaluate import Perplexity, perplexity
from tuning.frozen import DTYPES, frozen_model, resolve_dtype
from tuning.loop import IGNORE, document_windows, lr_factor, masked_loss, restore_rng, rng_snapshot, seed_everything
from worker.model import RWKV5, read_checkpoint, weights_fingerprint
from worker.state import State, time_state_to_dict

Mode = Literal["full", "state", "lora", "pissa"]
MODES: tuple[str, ...] = ("full", "state", "lora", "pissa")
Windows = Literal["random", "document"]
# State tuning takes far larger steps than weights: RWKV-PEFT uses lr 1 for it, and on the demo's model lr 1e-2
# moved held-out perplexity by 0.01% in 40 steps where lr 1 moved it by 1.3% (docs/tuning.md). Adapters start
# from a zero (LoRA) or small update and take a few times full fine-tuning's rate.
DEFAULT_LR: dict[str, float] = {"full": 1e-4, "state": 1.0, "lora": 2e-4, "pissa": 2e-4}
CHECKPOINT_FORMAT = "rwkv-serve-train-checkpoint"


@dataclass
class TrainConfig:
    """One training run's settings (the CLI's options)."""

    model: Path  # the base checkpoint (official .pth)
    data: Path  # training TokenDataset (.pt)
    out: Path  # run folder: model.pth / adapter.pt / state.pth, last.pt, log.json
    val: Path | None = None  # validation TokenDataset: perplexity before and after (and every eval_every steps)
    mode: Mode = "full"
    ctx_len: int = 128  # tokens per training window
    batch_size: int = 4
    lr: float | None = None  # None: DEFAULT_LR[mode]
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 10  # steps of linear warmup from lr / warmup
    steps: int = 100  # total steps of the schedule
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    weight_decay: float = 0.01  # full mode, 2-D weights only (not norms, mixes, decays, the state or adapters)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    # random: windows at random offsets of the concatenated text, starting from the initial state (RWKV-LM);
    # document: each sample is one dialogue from its beginning, padded, as a session sees it (state tuning).
    windows: Windows = "random"
    grad_checkpoint: bool = False  # recompute each block in backward: less activation memory, ~30% slower
    seed: int = 0
    device: str = "cpu"
    # auto: bf16 autocast for full fine-tuning on CUDA, none otherwise (the frozen modes' matmuls already run in
    # base_dtype); bf16: autocast in every mode (then tuning.memory_plan's activation bytes are approximate).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = 0  # 0: validation only before and after
    save_every: int = 0  # 0: last.pt only at the end
    save_dtype: Literal["same", "fp32", "bf16", "fp16"] = "same"  # dtype of model.pth (full, lora, pissa)
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # frozen weights (not full); auto: bf16 on CUDA
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "all"  # all, att, ffn or a comma-separated list of tuning.lora.TARGETS
    pissa_niter: int = 0  # PiSSA's SVD: 0 exact, > 0 randomized with that many iterations

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def lora_config(self) -> lora.LoRAConfig:
        return lora.LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                               targets=lora.parse_targets(self.lora_targets),
                               init="pissa" if self.mode == "pissa" else "lora", seed=self.seed,
                               pissa_niter=self.pissa_niter)


@dataclass
class StepResult:
    """What one optimizer step did."""

    step: int  # steps done after this one
    loss: float  # masked cross-entropy of the batch
    tokens: int  # input tokens processed (padding excluded)
    targets: int  # targets in the loss
    lr: float  # learning rate used for this step
    grad_norm: float  # before clipping


@dataclass
class Built:
    """A mode's model and what trains in it."""

    model: RWKV5
    trainable: list[torch.Tensor]  # what the optimizer steps, in a fixed order
    groups: list[dict[str, Any]]  # AdamW parameter groups
    time_state: torch.Tensor | None = None  # state mode: (L, H, N, N) [key, value]
    adapters: lora.Adapters | None = None  # lora / pissa


def build(mode: str, source: dict[str, torch.Tensor], device: torch.device, base_dtype: torch.dtype,
          lora_cfg: lora.LoRAConfig | None, fingerprint: bytes, weight_decay: float) -> Built:
    """The model of a run and its trainable tensors, from a checkpoint's tensors (or meta tensors: a memory plan)."""
    if mode == "full":
        # fp32 master weights, every one trained.
        params = {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in source.items()}
        model = RWKV5(params, device=device, trainable=True, fingerprint=fingerprint)
        named = list(model.params.items())
        for _, p in named:
            p.requires_grad_(True)
        # Decay only matrices (embedding, head, projections): norms, mixes, decay rates and bonuses are
        # per-channel parameters that weight decay would pull toward meaningless zeros.
        matrix = {n for n, p in named if n.endswith(".weight") and p.dim() == 2}
        groups = [{"params": [p for n, p in named if n in matrix], "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n not in matrix], "weight_decay": 0.0}]
        return Built(model, [p for _, p in named], groups)
    model = frozen_model(source, device, base_dtype, fingerprint)
    c = model.config
    time_state = adapters = None
    if mode == "state":
        # [key, value] layout, as the model's WKV state; saved transposed ([value, key]) like RWKV-PEFT.
        time_state = torch.zeros(c.n_layer, c.n_head, c.head_size, c.head_size, device=device, requires_grad=True)
        trainable = [time_state]
    elif mode in ("lora", "pissa"):
        if lora_cfg is None:
            raise ValueError(f"{mode} mode needs a LoRAConfig")
        adapters = lora.attach(model, lora_cfg, source)
        trainable = adapters.parameters()
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    # No weight decay: it would pull the state toward zeros and an adapter toward its initial value.
    return Built(model, trainable, [{"params": trainable, "weight_decay": 0.0}], time_state, adapters)


class Trainer:
    """A training run: the model, what trains, the optimizer and schedule, the data stream and the step count."""

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        seed_everything(cfg.seed)
        # The original file's key order and dtypes: the reference package detects v5.2 by key order, and an
        # official checkpoint is 16-bit, so a fine-tuned file is written back the way it came.
        source = read_checkpoint(cfg.model)
        self.key_order = list(source)
        self.source_dtypes = {k: v.dtype for k, v in source.items()}
        self.base_fingerprint = weights_fingerprint(source)
        self.train_ds = TokenDataset.load(cfg.data)
        self.val_ds = TokenDataset.load(cfg.val) if cfg.val else None
        lora_cfg = cfg.lora_config() if cfg.mode in ("lora", "pissa") else None
        built = build(cfg.mode, source, self.device, resolve_dtype(cfg.base_dtype, self.device), lora_cfg,
                      self.base_fingerprint, cfg.weight_decay)
        del source
        self.model, self.trainable = built.model, built.trainable
        self.time_state, self.adapters = built.time_state, built.adapters
        self.model.grad_checkpoint = cfg.grad_checkpoint
        self.optimizer = torch.optim.AdamW(built.groups, lr=cfg.learning_rate, betas=cfg.betas, eps=cfg.eps)
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
        """bf16 autocast where asked (auto: full fine-tuning on CUDA); the WKV state stays fp32 either way."""
        cuda_full = self.cfg.mode == "full" and self.device.type == "cuda"
        bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and cuda_full)
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def initial_state(self, batch_size: int) -> State:
        """Zeros, or (state mode) the trained WKV state for every row with zero shift vectors."""
        state = self.model.init_state(batch_size)
        if self.time_state is not None:
            state.wkv = self.time_state.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (L, B, H, N, N)
        return state

    def loss(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The forward of one batch (on the model's device) to its masked loss."""
        with self.autocast():
            logits, _ = self.model.forward(x, self.initial_state(x.shape[0]), all_logits=True)
        return masked_loss(logits, y, m)

    def train_step(self) -> StepResult:
        """One batch: forward, masked loss, backward, clip, AdamW, schedule."""
        x, y, m = (t.to(self.device) for t in next(self._batches))
        lr = self.optimizer.param_groups[0]["lr"]
        loss, targets = self.loss(x, y, m)
        loss.backward()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        self.optimizer.step()
        self.scheduler.step()
        # Gradients are dropped here, not before the next backward: they would sit beside that forward's
        # activations for nothing (tuning.memory_plan counts memory this way).
        self.optimizer.zero_grad(set_to_none=True)
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
        """Write the result: the fine-tuned or merged model (official .pth; with adapters, `adapter.pt` beside
        it), or the tuned state (time_state .pth)."""
        if self.time_state is not None:
            path = path or self.cfg.out / "state.pth"
            shift = torch.zeros(self.model.config.n_layer, 1, self.model.config.n_embd)
            sd = time_state_to_dict(State(shift, self.time_state.detach().cpu().unsqueeze(1), shift))
        elif self.adapters is not None:
            path = path or self.cfg.out / "model.pth"
            adapter = self.save_adapter(path.with_name("adapter.pt"))
            merged = lora.merge(read_checkpoint(self.cfg.model), lora.load_adapter(adapter))
            sd = {k: merged[k].to(self._save_dtype(k)).contiguous() for k in self.key_order}
        else:
            path = path or self.cfg.out / "model.pth"
            params = self.model.state_dict()
            sd = {k: params[k].cpu().to(self._save_dtype(k)).contiguous() for k in self.key_order}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, str(path))
        return path

    def save_adapter(self, path: Path | None = None) -> Path:
        """The adapter alone (lora/pissa modes): `python -m tuning.merge` folds it into the base later."""
        if self.adapters is None:
            raise RuntimeError(f"a {self.cfg.mode} tuning run has no adapter")
        return lora.save_adapter(self.adapters, path or self.cfg.out / "adapter.pt", self.base_fingerprint)

    def _save_dtype(self, key: str) -> torch.dtype:
        return self.source_dtypes[key] if self.cfg.save_dtype == "same" else DTYPES[self.cfg.save_dtype]

    def _trained(self) -> dict[str, torch.Tensor]:
        if self.time_state is not None:
            return {"time_state": self.time_state.detach().cpu()}
        if self.adapters is not None:
            return self.adapters.state_dict()
        return {k: v.detach().cpu() for k, v in self.model.params.items()}

    def save_checkpoint(self, path: Path | None = None) -> Path:
        """Everything needed to continue this run exactly: trained tensors, optimizer, schedule, step, RNG, data."""
        path = path or self.cfg.out / "last.pt"
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": 1, "mode": self.cfg.mode, "step": self.step,
            "trained": self._trained(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "batches_consumed": self.step,  # the data position: one batch per step, replayed from the seed
            "losses": self.losses, "evals": self.evals, "rng": rng_snapshot(),
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
        trained = ckpt["trained"]
        with torch.no_grad():
            if self.time_state is not None:
                self.time_state.copy_(trained["time_state"])
            elif self.adapters is not None:
                lora.load_into(self.adapters, self.model, trained, read_checkpoint(self.cfg.model))
            else:
                missing = set(self.model.params) ^ set(trained)
                if missing:
                    raise ValueError(f"{path} does not match the model (differing keys {sorted(missing)[:3]})")
                for k, v in trained.items():
                    self.model.params[k].copy_(v)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.losses, self.evals = ckpt["step"], list(ckpt["losses"]), list(ckpt["evals"])
        restore_rng(ckpt["rng"])
        self._batches = self._batch_stream(skip=ckpt["batches_consumed"])

    def write_log(self, extra: dict[str, Any] | None = None) -> Path:
        """log.json: the configuration, per-step losses and validation results."""
        path = self.cfg.out / "log.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        log = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.cfg).items()},
               "step": self.step, "losses": self.losses, "evals": self.evals, **(extra or {})}
        path.write_text(json.dumps(log, indent=1) + "\n")
        return path
