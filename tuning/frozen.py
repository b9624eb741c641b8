"""The serving model in trainable mode with its weights frozen in a chosen dtype (bf16/fp16/fp32), never in fp32 first.

`RWKV5(trainable=True)` keeps every weight as an fp32 tensor: right for full fine-tuning (fp32 master weights),
48 GB for the 12B model where LoRA and state tuning need the weights only to read them. `frozen_model` builds the
same module on the meta device (shapes only, no memory), then gives it each checkpoint tensor once, already in
its final dtype: matrices (projections, embedding, head) in `base_dtype`, the small per-channel tensors (norms,
token-shift mixes, decays) in fp32 as the model computes with them. The forward is the model's own code: its
torch-kernel `Linear` casts its input to the weight's dtype and returns fp32.
"""
from __future__ import annotations

import torch

from worker.checkpoint import ffn_size_for
from worker.linear import Linear
from worker.model import RWKV5, RWKV5Config, weights_fingerprint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_small(name: str, t: torch.Tensor) -> bool:
    """Per-channel tensors the model keeps in fp32 whatever the weights' dtype (the rule of RWKV5.__init__)."""
    return t.dim() < 2 or "time_" in name or ".ln" in name or name.startswith("ln_out")


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """`auto` is bf16 on CUDA (the card's fast path, half the bytes) and fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def config_for(n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64) -> RWKV5Config:
    """The shape of a released RWKV-5.2 model of this depth and width."""
    return RWKV5Config(n_layer, n_embd, n_embd // head_size, head_size, ffn_size_for(n_embd), vocab_size)


def meta_params(c: RWKV5Config, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors on the meta device (names, shapes, dtype; no data), in worker.checkpoint's key order."""
    D, F, H, N = c.n_embd, c.ffn_size, c.n_head, c.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (c.vocab_size, D)}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        names = ["ln0.weight", "ln0.bias"] if i == 0 else []
        names += ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight", "att.ln_x.bias"]
        shapes.update({b + n: (D,) for n in names})
        shapes[b + "att.gate.weight"] = (D, D)
        shapes.update({b + f"att.time_mix_{x}": (1, 1, D) for x in "kvrg"})
        shapes[b + "att.time_decay"] = shapes[b + "att.time_faaaa"] = (H, N)
        shapes.update({b + f"att.{n}.weight": (D, D) for n in ("receptance", "key", "value", "output")})
        shapes[b + "ffn.time_mix_k"] = shapes[b + "ffn.time_mix_r"] = (1, 1, D)
        shapes.update({b + "ffn.key.weight": (F, D), b + "ffn.receptance.weight": (D, D),
                       b + "ffn.value.weight": (D, F)})
    shapes.update({"ln_out.weight": (D,), "ln_out.bias": (D,), "head.weight": (c.vocab_size, D)})
    return {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}


def frozen_model(params: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 base_dtype: torch.dtype = torch.float32, fingerprint: bytes | None = None) -> RWKV5:
    """A trainable-mode RWKV5 over `params` with every tensor frozen: matrices in `base_dtype`, the rest fp32.

    `params` may be memory-mapped (read_checkpoint) or on the meta device (then so is the model: a memory plan).
    Each tensor is copied once, straight into its final dtype on `device`."""
    device = torch.device(device)
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in params.items()}
    if fingerprint is None:
        fingerprint = bytes(32) if device.type == "meta" else weights_fingerprint(params)
    model = RWKV5(shapes, device="meta", trainable=True, fingerprint=fingerprint)
    model.device = device  # init_state and the data go here
    p = model.params  # the dict every TimeMix / ChannelMix reads its per-channel tensors from at each refresh()
    for name, t in params.items():
        dtype = torch.float32 if is_small(name, t) else base_dtype
        p[name] = t.to(device=device, dtype=dtype, copy=True)  # own, writable memory: not the file's mapping
    # Whatever the model cached at construction points at the meta tensors: point it at the real ones.
    model.emb = p["emb.weight"]
    model.ln0 = (p["blocks.0.ln0.weight"], p["blocks.0.ln0.bias"])
    model.ln1 = [(p[f"blocks.{i}.ln1.weight"], p[f"blocks.{i}.ln1.bias"]) for i in range(model.config.n_layer)]
    model.ln2 = [(p[f"blocks.{i}.ln2.weight"], p[f"blocks.{i}.ln2.bias"]) for i in range(model.config.n_layer)]
    model.ln_out = (p["ln_out.weight"], p["ln_out.bias"])
    model.head = Linear(p["head.weight"], "torch")
    for att, ffn in zip(model.att, model.ffn):
        att.rkvg = [Linear(p[att.a + f"{n}.weight"], "torch") for n in ("receptance", "key", "value", "gate")]
        att.output = Linear(p[att.a + "output.weight"], "torch")
        ffn.key, ffn.value, ffn.receptance = (Linear(p[ffn.f + f"{n}.weight"], "torch")
                                              for n in ("key", "value", "receptance"))
        att.refresh()
        ffn.refresh()
    return model
