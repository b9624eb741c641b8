"""`python -m tuning.memory_plan`: the GPU memory a training method needs, computed from the module, not guessed.

The run is built exactly as `tuning.train` builds it (tuning.trainer.build), on the meta device: every tensor
has its shape and dtype but no memory, so the 12B model costs nothing to plan. Then:
- weights, adapters / state, gradients and optimizer states are the bytes of those tensors (AdamW: two fp32
  moments per trained element, plus a 4-byte step count per tensor);
- activations: one training step (forward, masked loss, backward) at the given micro-batch and context is run on
  the meta tensors under tuning.memtrack.MemoryTracker, which counts every tensor the step creates (saved for
  backward, temporaries, gradients) while it is alive: the peak, with and without per-block checkpointing.
The peak is resident (weights, adapters, optimizer states) + the step's tracked peak (which includes gradients as
they are created). `fits` compares peak x (1 + headroom) with the card: CUDA context, cuBLAS workspaces and the
caching allocator's fragmentation are not tensors and are not tracked (headroom 10% by default).

Not counted: the optimizer step's temporaries (AdamW on CUDA runs foreach: up to one fp32 copy of the trained
tensors, which matters for full fine-tuning only), PiSSA's one-off SVD at start (one matrix at a time, ~1 GB at
12B, before any activation exists), bf16 autocast (the frozen modes run without it; full mode's bf16 autocast
would add bf16 copies of the weights and halve some activations).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from tuning import lora
from tuning.frozen import DTYPES, config_for, meta_params
from tuning.loop import masked_mean_nll
from tuning.memtrack import MemoryTracker, nbytes
from tuning.trainer import Built, build
from worker.model import RWKV5Config

GIB = 1 << 30
# Released RWKV-5.2 World shapes (n_layer, n_embd); vocab 65536, head size 64.
SHAPES = {"0.4b": (24, 1024), "1.5b": (24, 2048), "3b": (32, 2560), "7b": (32, 4096), "12b": (32, 5120)}
# What torch.cuda.get_device_properties(...).total_memory reports on these cards, in GiB.
CARDS = {"a100-80g": 79.2, "h100-80g": 79.1, "h200": 139.8, "a100-40g": 39.4, "l40s-48g": 44.4, "24g": 23.6}
METHODS = ("lora", "pissa", "state", "full")


@dataclass
class MemoryPlan:
    """Bytes of one training configuration on one device."""

    shape: str
    method: str
    ctx_len: int
    micro_batch: int
    base_dtype: str  # frozen weights' dtype (full fine-tuning: fp32 master weights)
    lora_rank: int
    grad_checkpoint: bool
    parameters: int  # elements of the model (without adapters)
    trained: int  # elements trained
    weights: int  # the model's tensors (frozen, or fp32 masters in full mode)
    adapters: int  # trained tensors beside the weights (adapters, PiSSA's initial factors, the state); 0 in full
    gradients: int  # one fp32 gradient per trained element
    optimizer: int  # AdamW states
    activations: int  # tracked peak of the step's non-gradient tensors (saved for backward and temporaries)
    step_peak: int  # tracked peak of everything the step creates (activations + gradients at that moment)

    @property
    def resident(self) -> int:
        return self.weights + self.adapters + self.optimizer

    @property
    def peak(self) -> int:
        return self.resident + self.step_peak

    def fits(self, card: str, headroom: float = 0.10) -> bool:
        return self.peak * (1 + headroom) <= CARDS[card] * GIB


def build_for_plan(c: RWKV5Config, method: str, device: str | torch.device, base_dtype: torch.dtype,
                   lora_cfg: lora.LoRAConfig, source: dict[str, torch.Tensor] | None = None) -> Built:
    """The run's model and trainable tensors as tuning.train builds them; on meta tensors unless `source` is given."""
    source = meta_params(c) if source is None else source
    return build(method, source, torch.device(device), base_dtype,
                 lora_cfg if method in ("lora", "pissa") else None, bytes(32), 0.0)


def track_step(built: Built, micro_batch: int, ctx_len: int, grad_checkpoint: bool,
               tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> MemoryTracker:
    """Run forward, masked loss and backward once under a MemoryTracker (the trainer's step up to the optimizer)."""
    model = built.model
    model.grad_checkpoint = grad_checkpoint
    dev = model.device
    if tokens is None:
        x = torch.zeros(micro_batch, ctx_len, dtype=torch.long, device=dev)
        tokens = (x, x, torch.ones(micro_batch, ctx_len, dtype=torch.uint8, device=dev))
    x, y, m = tokens
    existing = [*model.params.values(), *built.trainable]
    if built.adapters is not None:
        existing += [*built.adapters.A0.values(), *built.adapters.B0.values()]
    with MemoryTracker(existing, grads_of=built.trainable) as tracker:
        state = model.init_state(x.shape[0])
        if built.time_state is not None:
            state.wkv = built.time_state.unsqueeze(1).expand(-1, x.shape[0], -1, -1, -1)
        logits, _ = model.forward(x, state, all_logits=True)
        loss = masked_mean_nll(logits, y, m)
        del logits, state
        loss.backward()
        del loss
    for p in built.trainable:
        p.grad = None
    return tracker


def measured_peak(trainer) -> dict[str, int]:
    """A real training step's memory (tuning.trainer.Trainer, any device): resident tensors (weights, trainees,
    optimizer states) and the tracked peak of forward + loss + backward on the next batch. The optimizer does not
    step and the gradients are dropped, so the run is left as it was (but for the batch drawn)."""
    existing = [*trainer.model.params.values(), *trainer.trainable]
    if trainer.adapters is not None:
        existing += [*trainer.adapters.A0.values(), *trainer.adapters.B0.values()]
    existing += [t for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    x, y, m = (t.to(trainer.device) for t in next(trainer._batches))
    with MemoryTracker(existing, grads_of=trainer.trainable) as tracker:
        loss, _ = trainer.loss(x, y, m)
        loss.backward()
        del loss
    trainer.optimizer.zero_grad(set_to_none=True)
    resident = nbytes(existing)
    return {"resident": resident, "step_peak": tracker.peak, "peak": resident + tracker.peak}


def optimizer_bytes(trainable: list[torch.Tensor]) -> int:
    """AdamW's states: exp_avg and exp_avg_sq like each tensor, and a 4-byte fp32 step count per tensor."""
    return sum(2 * t.numel() * t.element_size() + 4 for t in trainable)


def plan(shape: str | RWKV5Config, method: str, ctx_len: int, micro_batch: int = 1, *, base_dtype: str = "bf16",
         lora_rank: int = 64, lora_targets: str = "all", grad_checkpoint: bool = True, device: str = "meta",
         source: dict[str, torch.Tensor] | None = None, exact: bool = False) -> MemoryPlan:
    """The memory plan of one configuration (`device="cpu"` with a `source` checkpoint: the same on real tensors).

    The step is tracked at the full depth when `exact` (or with a `source`, or at most 4 layers); else at 2 and 4
    layers of the full width, context and batch, and extrapolated linearly to n_layer: every block runs the same
    code on the same shapes, so both peaks are affine in the depth (tests/test_memory_plan.py checks this against
    the full-depth count). Weights, adapters, gradients and optimizer states are always counted at full depth."""
    c = config_for(*SHAPES[shape]) if isinstance(shape, str) else shape
    name = shape if isinstance(shape, str) else f"L{c.n_layer} D{c.n_embd} V{c.vocab_size}"
    dtype = DTYPES[base_dtype]
    lora_cfg = lora.LoRAConfig(rank=lora_rank, alpha=lora_rank, targets=lora.parse_targets(lora_targets),
                               init="pissa" if method == "pissa" else "lora")
    built = build_for_plan(c, method, device, dtype, lora_cfg, source)
    model_keys = {p.untyped_storage()._cdata for p in built.model.params.values()}
    extra = [t for t in built.trainable if t.untyped_storage()._cdata not in model_keys]
    if built.adapters is not None:
        extra += [*built.adapters.A0.values(), *built.adapters.B0.values()]
    if exact or source is not None or c.n_layer <= 4:
        tracker = track_step(built, micro_batch, ctx_len, grad_checkpoint)
        activations, step_peak = tracker.peak_other, tracker.peak
    else:
        counts = []
        for depth in (2, 4):
            shallow = build_for_plan(replace(c, n_layer=depth), method, device, dtype, lora_cfg)
            t = track_step(shallow, micro_batch, ctx_len, grad_checkpoint)
            counts.append((t.peak_other, t.peak))
        (a2, p2), (a4, p4) = counts
        activations = round(a2 + (a4 - a2) / 2 * (c.n_layer - 2))
        step_peak = round(p2 + (p4 - p2) / 2 * (c.n_layer - 2))
    return MemoryPlan(
        shape=name, method=method, ctx_len=ctx_len, micro_batch=micro_batch,
        base_dtype="fp32" if method == "full" else base_dtype, lora_rank=lora_rank if method in ("lora", "pissa")
        else 0, grad_checkpoint=grad_checkpoint, parameters=sum(p.numel() for p in built.model.params.values()),
        trained=sum(t.numel() for t in built.trainable), weights=nbytes(built.model.params.values()),
        adapters=nbytes(extra) if extra else 0, gradients=sum(t.numel() * 4 for t in built.trainable),
        optimizer=optimizer_bytes(built.trainable), activations=activations, step_peak=step_peak)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def gib(n: int) -> str:
    return f"{n / GIB:,.2f}"


def markdown(plans: list[MemoryPlan], cards: list[str], headroom: float) -> str:
    """The plans as a Markdown table (one row per method and checkpointing choice)."""
    head = ["method", "trained", "weights", "adapters / state", "gradients", "AdamW", "activations", "peak",
            *[f"fits {c}" for c in cards]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for p in plans:
        ck = "per-block checkpointing" if p.grad_checkpoint else "no checkpointing"
        name = f"{p.method}{f' r{p.lora_rank}' if p.lora_rank else ''} ({p.base_dtype} weights), {ck}"
        cells = [name, f"{p.trained / 1e6:,.1f}M", gib(p.weights), gib(p.adapters), gib(p.gradients),
                 gib(p.optimizer), gib(p.activations), f"**{gib(p.peak)}**",
                 *["yes" if p.fits(c, headroom) else "no" for c in cards]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    shape: str = typer.Option("12b", help=f"Model shape: {', '.join(SHAPES)}, or LxD (e.g. 32x5120)."),
    method: str = typer.Option("lora", help=f"Comma-separated methods: {', '.join(METHODS)}."),
    ctx_len: int = typer.Option(4096, help="Tokens per training window."),
    micro_batch: int = typer.Option(1, help="Windows per step."),
    base_dtype: str = typer.Option("bf16", help="Frozen weights' dtype (lora, pissa, state): bf16, fp16, fp32."),
    lora_rank: int = typer.Option(64, help="Adapter rank."),
    lora_targets: str = typer.Option("all", help="Adapted projections (as tuning.train --lora-targets)."),
    checkpointing: str = typer.Option("both", help="Per-block gradient checkpointing: on, off or both."),
    card: str = typer.Option("a100-80g,24g", help=f"Comma-separated cards: {', '.join(CARDS)}."),
    headroom: float = typer.Option(0.10, help="Fraction added to the peak for what is not a tensor."),
    exact: bool = typer.Option(False, "--exact", help="Track every layer (slow at 12B) instead of 2 and 4."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the plans here."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Write the Markdown table here."),
) -> None:
    """Bytes of weights, adapters, gradients, optimizer states and activations; whether they fit each card."""
    methods, cards = [m.strip() for m in method.split(",")], [c.strip() for c in card.split(",")]
    for m in methods:
        if m not in METHODS:
            raise typer.BadParameter(f"--method: {m!r} is not one of {', '.join(METHODS)}")
    for c in cards:
        if c not in CARDS:
            raise typer.BadParameter(f"--card: {c!r} is not one of {', '.join(CARDS)}")
    if base_dtype not in DTYPES or checkpointing not in ("on", "off", "both"):
        raise typer.BadParameter("--base-dtype is bf16, fp16 or fp32; --checkpointing on, off or both")
    if shape in SHAPES:
        target: str | RWKV5Config = shape
    else:
        try:
            n_layer, n_embd = (int(v) for v in shape.lower().split("x"))
        except ValueError as e:
            raise typer.BadParameter(f"--shape: {shape!r} is neither {', '.join(SHAPES)} nor LxD") from e
        target = config_for(n_layer, n_embd)
    ckpts = {"on": [True], "off": [False], "both": [False, True]}[checkpointing]
    plans = [plan(target, m, ctx_len, micro_batch, base_dtype=base_dtype, lora_rank=lora_rank,
                  lora_targets=lora_targets, grad_checkpoint=ck, exact=exact) for m in methods for ck in ckpts]
    table = Table(title=f"{plans[0].shape}: ctx {ctx_len}, micro-batch {micro_batch} (GiB)")
    for col in ("method", "ckpt", "trained", "weights", "adapters/state", "grads", "AdamW", "activations", "peak",
                *cards):
        table.add_column(col, justify="left" if col in ("method", "ckpt") else "right")
    for p in plans:
        table.add_row(p.method, "on" if p.grad_checkpoint else "off", f"{p.trained / 1e6:,.1f}M", gib(p.weights),
                      gib(p.adapters), gib(p.gradients), gib(p.optimizer), gib(p.activations), gib(p.peak),
                      *["fits" if p.fits(c, headroom) else "no" for c in cards])
    Console().print(table)
    if json_out is not None:
        rows = [{**asdict(p), "peak": p.peak, "fits": {c: p.fits(c, headroom) for c in cards}} for p in plans]
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"cards_gib": {c: CARDS[c] for c in cards}, "headroom": headroom,
                                        "plans": rows}, indent=1) + "\n")
    if markdown_out is not None:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(markdown(plans, cards, headroom))


if __name__ == "__main__":
    app()
