"""Low-rank adapters (LoRA, PiSSA) on the projections of the serving model's blocks, their file and their merge.

Why not `peft`: peft adapts `torch.nn` modules (nn.Linear, nn.Embedding, Conv), found by module name in an
nn.Module tree. worker/model.py is not an nn.Module tree: its weights are plain tensors in one dict under the
checkpoint's names, multiplied by worker.linear.Linear objects. Making peft fit would mean rewriting the serving
model as nn.Modules (or registering a custom peft layer class for every projection), so this is the small module
instead: each chosen `Linear` of a block is wrapped, in place, by a `LoRALinear` that adds the low-rank path.

    y = x W^T + s (x A^T) B^T        A (r, in), B (out, r), s = alpha / r; W frozen, A and B trained (fp32)

LoRA: A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's init), B = 0, so training starts at the base model.
PiSSA: the top-r singular triplets of W go into the adapter, B A = U_r S_r V_r^T / s (each factor takes sqrt(S_r)),
and W is replaced by the residual W - s B A, frozen: the model starts unchanged, but trains the principal
directions. The file keeps the adapter's initial A0, B0 beside A, B, so that merging needs only the base
checkpoint: W + s (B A - B0 A0).

Adapter file (torch.save, loadable with weights_only=True), keys after RWKV-PEFT's naming:
    {"format": "rwkv-serve-lora", "version": 1, "method": "lora"|"pissa", "rank", "alpha", "targets",
     "base_fingerprint": hex, "tensors": {"blocks.0.att.key.lora_A": (r, in), ".lora_B": (out, r),
     and for PiSSA ".lora_A0", ".lora_B0"}}
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from worker.linear import Linear
from worker.model import RWKV5

ADAPTER_FORMAT = "rwkv-serve-lora"
# Every projection of a block, by its checkpoint name minus "blocks.N." and ".weight".
TARGETS = ("att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.key", "ffn.value", "ffn.receptance")
_RKVG = ("att.receptance", "att.key", "att.value", "att.gate")  # TimeMix.rkvg's order
Init = Literal["lora", "pissa"]


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """"all", "att", "ffn" or a comma-separated list of TARGETS (e.g. "att.key,att.value") -> target names."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for s in items:
        chosen = [t for t in TARGETS if s == "all" or t == s or t.startswith(s + ".")]
        if not chosen:
            raise ValueError(f"unknown LoRA target {s!r}; use all, att, ffn or some of {', '.join(TARGETS)}")
        out += [t for t in chosen if t not in out]
    if not out:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in out)  # a fixed order: the parameters' order never depends on the spec


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how."""

    rank: int = 16  # r: trainable parameters per projection are r * (in + out)
    alpha: float = 32.0  # the update is scaled by alpha / r (so a change of rank keeps the step size comparable)
    targets: tuple[str, ...] = TARGETS
    init: Init = "lora"
    seed: int = 0  # of the A matrices' random init (LoRA); independent of the data order
    pissa_niter: int = 0  # 0: exact SVD; > 0: torch.svd_lowrank with this many subspace iterations (large models)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear:
    """A frozen projection plus a trainable low-rank path; called like worker.linear.Linear (fp32 out)."""

    def __init__(self, base: Linear, A: torch.Tensor, B: torch.Tensor, scale: float):
        self.base, self.A, self.B, self.scale = base, A, B, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The base matmul runs in the weight's dtype (bf16 at scale); the adapter's in fp32 (it is small).
        return self.base(x) + self.scale * F.linear(F.linear(x.float(), self.A), self.B)


def _get(model: RWKV5, i: int, target: str) -> Linear:
    part, name = target.split(".")
    if target in _RKVG:
        return model.att[i].rkvg[_RKVG.index(target)]
    return getattr(model.att[i] if part == "att" else model.ffn[i], name)


def _set(model: RWKV5, i: int, target: str, lin) -> None:
    part, name = target.split(".")
    if target in _RKVG:
        model.att[i].rkvg[_RKVG.index(target)] = lin
    else:
        setattr(model.att[i] if part == "att" else model.ffn[i], name, lin)


def _principal(W: torch.Tensor, rank: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of W (fp32): U (out, r), S (r,), Vh (r, in)."""
    if niter <= 0 or W.is_meta:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(W, q=min(rank + 8, *W.shape), niter=niter)
    return U[:, :rank], S[:rank], V[:, :rank].T


@dataclass
class Adapters:
    """The adapters attached to a model, by weight name ("blocks.3.att.key"): A, B (trained) and PiSSA's A0, B0."""

    cfg: LoRAConfig
    A: dict[str, torch.Tensor] = field(default_factory=dict)
    B: dict[str, torch.Tensor] = field(default_factory=dict)
    A0: dict[str, torch.Tensor] = field(default_factory=dict)  # PiSSA only: the initial factors, frozen
    B0: dict[str, torch.Tensor] = field(default_factory=dict)

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors, in a fixed order (layer, target, A then B)."""
        return [t for name in self.A for t in (self.A[name], self.B[name])]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under their file keys ("blocks.0.att.key.lora_A", ...), detached, on the CPU."""
        sd = {}
        for name in self.A:
            sd[f"{name}.lora_A"], sd[f"{name}.lora_B"] = self.A[name], self.B[name]
            if name in self.A0:
                sd[f"{name}.lora_A0"], sd[f"{name}.lora_B0"] = self.A0[name], self.B0[name]
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    def file_dict(self, base_fingerprint: bytes) -> dict:
        """What `save_adapter` writes."""
        c = self.cfg
        return {"format": ADAPTER_FORMAT, "version": 1, "method": c.init, "rank": c.rank, "alpha": c.alpha,
                "targets": list(c.targets), "base_fingerprint": base_fingerprint.hex(), "tensors": self.state_dict()}


def attach(model: RWKV5, cfg: LoRAConfig, source: dict[str, torch.Tensor] | None = None) -> Adapters:
    """Wrap the chosen projections of every block of a frozen model (tuning.frozen) with adapters; returns them.

    PiSSA reads each W from `source` (the checkpoint's own tensors: the SVD of the original, not of a bf16 copy)
    when given, else from the model, and replaces the model's W by the residual, in the model's dtype."""
    ad = Adapters(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    p = model.params
    for i in range(model.config.n_layer):
        for target in cfg.targets:
            name = f"blocks.{i}.{target}"
            base = _get(model, i, target)
            W = p[name + ".weight"]
            out_f, in_f = W.shape
            if cfg.init == "pissa":
                W0 = (source[name + ".weight"] if source is not None else W).to(W.device, torch.float32)
                U, S, Vh = _principal(W0, cfg.rank, cfg.pissa_niter, cfg.seed)
                root = (S / cfg.scale).sqrt()
                A, B = root[:, None] * Vh, U * root[None, :]  # B A = U_r S_r Vh_r / s
                ad.A0[name], ad.B0[name] = A.clone(), B.clone()
                p[name + ".weight"] = residual(W0, A, B, cfg.scale, W.dtype)
                base = Linear(p[name + ".weight"], "torch")
            else:
                bound = 1 / in_f**0.5
                A = (torch.rand(cfg.rank, in_f, generator=g) * 2 - 1).mul_(bound).to(W.device)
                B = torch.zeros(out_f, cfg.rank, device=W.device)
            ad.A[name], ad.B[name] = A.requires_grad_(True), B.requires_grad_(True)
            _set(model, i, target, LoRALinear(base, ad.A[name], ad.B[name], cfg.scale))
    return ad


def residual(W: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """PiSSA's frozen part, W - s B0 A0, computed in fp32 and stored in `dtype`."""
    return (W.float() - scale * (B0.float() @ A0.float())).to(dtype)


def load_into(ad: Adapters, model: RWKV5, tensors: dict[str, torch.Tensor],
              source: dict[str, torch.Tensor] | None = None) -> None:
    """Set attached adapters to saved values (a resume); PiSSA's residuals are rebuilt from the saved A0, B0."""
    expected = set(ad.state_dict())
    if set(tensors) != expected:
        raise ValueError(f"adapter tensors differ from this run's (e.g. {sorted(set(tensors) ^ expected)[:3]})")
    with torch.no_grad():
        for name in ad.A:
            ad.A[name].copy_(tensors[f"{name}.lora_A"])
            ad.B[name].copy_(tensors[f"{name}.lora_B"])
            if name in ad.A0:
                ad.A0[name], ad.B0[name] = (tensors[f"{name}.lora_{x}0"].to(ad.A[name].device) for x in "AB")
                W0 = (source or model.params)[name + ".weight"]
                res = residual(W0, ad.A0[name], ad.B0[name], ad.cfg.scale, model.params[name + ".weight"].dtype)
                model.params[name + ".weight"].copy_(res)


# ---------------------------------------------------------------------------------------------------------------
# Files and merging
# ---------------------------------------------------------------------------------------------------------------


def save_adapter(ad: Adapters, path: Path, base_fingerprint: bytes) -> Path:
    """Write the adapter alone (rank x (in + out) per projection: a small file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ad.file_dict(base_fingerprint), str(path))
    return path


def load_adapter(path: str | Path) -> dict:
    """Read and check an adapter file written by `save_adapter`."""
    f = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(f, dict) or f.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an adapter file of this trainer (format {ADAPTER_FORMAT!r})")
    if f.get("version") != 1:
        raise ValueError(f"{path}: adapter format version {f.get('version')} is not supported (1)")
    return f


def delta(adapter: dict, name: str) -> torch.Tensor:
    """The fp32 change an adapter file makes to weight `name` ("blocks.0.att.key"): s (B A - B0 A0)."""
    t, scale = adapter["tensors"], adapter["alpha"] / adapter["rank"]
    d = t[f"{name}.lora_B"].float() @ t[f"{name}.lora_A"].float()
    if f"{name}.lora_A0" in t:
        d -= t[f"{name}.lora_B0"].float() @ t[f"{name}.lora_A0"].float()
    return scale * d


def merge(base: dict[str, torch.Tensor], adapter: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base checkpoint with the adapter folded in: same keys, same order, each tensor in its own dtype (or
    `dtype`); the sum is done in fp32. An official-format state dict, loadable by any RWKV-5.2 runtime."""
    names = sorted({k.rsplit(".lora_", 1)[0] for k in adapter["tensors"]})
    missing = [n for n in names if n + ".weight" not in base]
    if missing:
        raise ValueError(f"the adapter targets weights the base lacks, e.g. {missing[0]}.weight")
    out = {}
    for k, v in base.items():
        n = k.removesuffix(".weight")
        t = v.float() + delta(adapter, n) if n in names else v
        out[k] = t.to(dtype or v.dtype).contiguous()
    return out
