"""RWKV-5.2 ("Eagle") inference in PyTorch: one readable file, batched step mode and exact chunked prefill.

Read top to bottom: config -> time mixing (attention) -> channel mixing (FFN) -> model -> checkpoint loading.
Names follow the official checkpoint keys so the file can be held beside the weights. How the matrices are
multiplied (the CPU kernel choice, packed weights) is worker/linear.py.
"""
from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from worker import cpu_kernels
from worker.linear import Linear
from worker.state import State

HEAD_SIZE_DIVISOR = 8  # RWKV-5 trains with head_size_divisor 8: GroupNorm eps 1e-5 on y/8 == eps 64e-5 on y
# Tokens per chunk of the parallel WKV; any size is exact. 8 was fastest here (4: 48 ms, 8: 36, 16: 97, 32: 192 per
# layer at T=512, D768): the (c, c, N) intra-chunk product stays in cache.
WKV_CHUNK = 8


class CheckpointError(ValueError):
    """A checkpoint that is not a readable RWKV-5.2 model (other architecture, truncated, missing keys)."""


@dataclass(frozen=True)
class RWKV5Config:
    """Shapes of an RWKV-5.2 model, read from its weights."""

    n_layer: int  # number of blocks: the state has one (shift, WKV, shift) triple per block
    n_embd: int  # D, width of the residual stream and of each shift vector
    n_head: int  # H, WKV heads; each keeps a head_size x head_size matrix of state
    head_size: int  # N, 64 in every released RWKV-5 model
    ffn_size: int  # F, hidden width of channel mixing (int(3.5 * D) // 32 * 32 in released models)
    vocab_size: int  # V, 65536 for World models

    @property
    def state_bytes(self) -> int:
        """Bytes of one session's state with everything in fp32."""
        return 4 * self.n_layer * (2 * self.n_embd + self.n_head * self.head_size**2)


# ---------------------------------------------------------------------------------------------------------------
# Time mixing: token shift, r/k/v/g projections, the WKV recurrence, GroupNorm, gated output
# ---------------------------------------------------------------------------------------------------------------


def wkv_step(r, k, v, w, u, s, out=None):
    """One token of the WKV recurrence for B sessions. r, k, v: (B, H, N); w, u: (H, N); s: (B, H, N, N) [key, value].

    Returns y (B, H, N) and the new state, written into `out` when given (the state is the big tensor at large B:
    it is read and written once, never materialised as k v^T separately)."""
    B, H, N = r.shape
    y = (r.unsqueeze(-2) @ s).squeeze(-2) + (r * u * k).sum(-1, keepdim=True) * v  # r.(u k v^T + S)
    out = torch.mul(s, w.unsqueeze(-1), out=out)  # w S ...
    out.view(B * H, N, N).baddbmm_(k.reshape(B * H, N, 1), v.reshape(B * H, 1, N))  # ... + k v^T
    return y, out


def wkv_chunked(r, k, v, log_w, u, s, chunk: int = WKV_CHUNK):
    """The WKV recurrence over T tokens, exactly, in parallel chunks. r, k, v: (B, H, T, N); log_w, u: (H, N); s fp32.

    y_t = sum_{s<t} (r_t . w^(t-s-1) k_s) v_s + (r_t . u k_t) v_t + (r_t w^t) S0
    and S_T = w^T S0 + sum_s (w^(T-1-s) k_s) v_s^T, with positions counted from the chunk's start. Every decay power
    is exp(exponent * log_w) with exponent >= 0, so nothing overflows and w is never clamped (dividing by powers of
    w, the usual trick, overflows for small w)."""
    B, H, T, N = r.shape
    full = T - T % chunk
    ys = []
    if full:
        y, s = _wkv_chunks(*(z[:, :, :full].reshape(B, H, full // chunk, chunk, N) for z in (r, k, v)), log_w, u, s)
        ys.append(y.reshape(B, H, full, N))
    if T > full:
        y, s = _wkv_chunks(*(z[:, :, full:].unsqueeze(2) for z in (r, k, v)), log_w, u, s)
        ys.append(y.squeeze(2))
    return torch.cat(ys, dim=2) if len(ys) > 1 else ys[0], s


def _wkv_chunks(r, k, v, log_w, u, s):
    """WKV over C chunks of c tokens: all intra-chunk work at once, then a short loop that carries the state.
    r, k, v: (B, H, C, c, N); log_w, u: (H, N); s: (B, H, N, N)."""
    B, H, C, c, N = r.shape
    t = torch.arange(c, device=r.device, dtype=torch.float32)
    lw = log_w.view(H, 1, N)
    # Inside a chunk: att[t, s] = r_t . (w^(t-s-1) * k_s) for s < t, plus the bonus u on the diagonal.
    gap = (t.view(c, 1) - t.view(1, c) - 1).clamp(min=0)
    below = torch.tril(torch.ones(c, c, device=r.device), -1).view(1, c, c, 1)
    decay = torch.exp(gap.view(1, c, c, 1) * log_w.view(H, 1, 1, N)) * below
    att = torch.einsum("bhjta,htsa,bhjsa->bhjts", r, decay, k)  # (B, H, C, c, c)
    att = att + torch.diag_embed((r * u.view(1, H, 1, 1, N) * k).sum(-1))
    y = att @ v  # (B, H, C, c, N)
    # Across chunks: each chunk reads the state left by the ones before it, decayed by w^t.
    kv = (k * torch.exp((c - 1 - t).view(c, 1) * lw).unsqueeze(1)).transpose(-1, -2) @ v  # (B, H, C, N, N)
    w_chunk = torch.exp(c * log_w).view(1, H, N, 1)
    states = []
    for j in range(C):
        states.append(s)
        s = w_chunk * s + kv[:, :, j]
    y = y + (r * torch.exp(t.view(c, 1) * lw).unsqueeze(1)) @ torch.stack(states, dim=2)
    return y, s


def token_shift(xx, shift):
    """Each position's previous ln output: the carried `shift` (B, D) for the first, then xx shifted by one."""
    if xx.shape[1] == 1:
        return shift.unsqueeze(1)
    return torch.cat([shift.unsqueeze(1), xx[:, :-1]], dim=1)


class TimeMix:
    """RWKV-5.2 attention ("time mixing") of one block."""

    def __init__(self, p: dict[str, torch.Tensor], i: int, cfg: RWKV5Config, scale: float, kernel: str = "auto"):
        self.p, self.a = p, f"blocks.{i}.att."
        self.rkvg = [Linear(p[self.a + f"{n}.weight"], kernel)
                     for n in ("receptance", "key", "value", "gate")]  # 4 x (D, D)
        self.output = Linear(p[self.a + "output.weight"], kernel)  # (D, D), pre-divided by `scale` in fp16 (see RWKV5)
        self.H, self.N, self.scale = cfg.n_head, cfg.head_size, scale
        self.refresh()

    def refresh(self) -> None:
        """Derive the per-channel tensors from the parameters (once for inference; every step when training)."""
        p, a = self.p, self.a
        self.mix = torch.stack([p[a + f"time_mix_{c}"].reshape(-1) for c in "rkvg"]).float()  # (4, D)
        self.log_w = -torch.exp(p[a + "time_decay"].float())  # (H, N): log of the per-channel decay w in (0, 1)
        self.w = torch.exp(self.log_w)
        self.u = p[a + "time_faaaa"].float().reshape(self.H, self.N)  # (H, N): bonus of the current token

    def __call__(self, xx, shift, s, s_out=None):
        """xx: (B, T, D) fp32 ln1 output; shift: (B, D) last xx of the previous call; s: (B, H, N, N) fp32 state,
        whose successor is returned (written into s_out when given)."""
        B, T, D = xx.shape
        prev = token_shift(xx, shift)  # (B, T, D)
        mixed = torch.lerp(prev.unsqueeze(0), xx.unsqueeze(0), self.mix.view(4, 1, 1, D))  # (4, B, T, D)
        r, k, v, g = (lin(m.view(B * T, D)) for lin, m in zip(self.rkvg, mixed))  # 4 x (B*T, D) fp32
        g = F.silu(g)
        heads = lambda z: z.view(B, T, self.H, self.N).transpose(1, 2)  # noqa: E731 - (B, H, T, N)
        if T == 1:
            y, s = wkv_step(r.view(B, self.H, self.N), k.view(B, self.H, self.N), v.view(B, self.H, self.N),
                            self.w, self.u, s, s_out)
            y = y.view(B * T, D)
        else:
            y, s = wkv_chunked(heads(r), heads(k), heads(v), self.log_w, self.u, s)
            if s_out is not None:
                s_out.copy_(s)
            y = y.transpose(1, 2).reshape(B * T, D)
        y = F.group_norm(y, self.H, self.p[self.a + "ln_x.weight"], self.p[self.a + "ln_x.bias"],
                         eps=1e-5 * HEAD_SIZE_DIVISOR**2)  # (B*T, D)
        out = self.output(y * g)
        if self.scale != 1.0:
            out = out * self.scale
        return out.view(B, T, D), xx[:, -1], s


# ---------------------------------------------------------------------------------------------------------------
# Channel mixing: token shift, squared-ReLU FFN gated by a sigmoid receptance
# ---------------------------------------------------------------------------------------------------------------


class ChannelMix:
    """RWKV-5 feed-forward ("channel mixing") of one block."""

    def __init__(self, p: dict[str, torch.Tensor], i: int, scale: float, kernel: str = "auto"):
        self.p, self.f = p, f"blocks.{i}.ffn."
        self.key, self.value, self.receptance = (Linear(p[self.f + n + ".weight"], kernel)
                                                 for n in ("key", "value", "receptance"))
        self.scale = scale
        self.refresh()

    def refresh(self) -> None:
        """Derive the per-channel tensors from the parameters."""
        self.mix_k = self.p[self.f + "time_mix_k"].reshape(-1).float()  # (D,)
        self.mix_r = self.p[self.f + "time_mix_r"].reshape(-1).float()  # (D,)

    def __call__(self, xx, shift):
        """xx: (B, T, D) fp32 ln2 output; shift: (B, D)."""
        prev = token_shift(xx, shift)  # (B, T, D)
        k = torch.relu(self.key(torch.lerp(prev, xx, self.mix_k))).square()  # (B, T, F)
        v = self.value(k)
        if self.scale != 1.0:
            v = v * self.scale
        out = torch.sigmoid(self.receptance(torch.lerp(prev, xx, self.mix_r))) * v
        return out, xx[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class RWKV5:
    """An RWKV-5.2 language model: pure `forward(tokens, state) -> (logits, state)`, B sessions at a time."""

    def __init__(self, params: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, fingerprint: bytes | None = None, trainable: bool = False,
                 kernel: str = "auto"):
        """`trainable`: keep every weight as a plain fp32 tensor in `self.params` (the checkpoint's names) that
        autograd can reach, and derive nothing from them ahead of time; the same forward then trains.
        `kernel`: how the matrices are multiplied on CPU, one of worker.linear.KERNELS (see worker.linear.Linear);
        `self.kernel` says which ran."""
        self.config = config_from_params(params)
        self.device, self.dtype, self.trainable = torch.device(device), dtype, trainable
        if trainable and dtype != torch.float32:
            raise ValueError("a trainable model keeps fp32 master weights; use torch.autocast for bf16")
        self.fingerprint = fingerprint or weights_fingerprint(params)
        cfg = self.config
        # Weights in `dtype` on `device`; small per-channel vectors and norms in fp32 (the residual stream is fp32).
        p = {}
        for name, t in params.items():
            small = t.dim() < 2 or "time_" in name or ".ln" in name or name.startswith("ln_out")
            if name == "emb.weight" and not trainable:
                p[name] = t  # stays in host memory, see below
                continue
            # Small tensors are copied so that nothing keeps the checkpoint's memory mapping alive after loading.
            p[name] = t.to(device=self.device, dtype=torch.float32 if small else dtype, copy=small)
        # fp16 overflows past 65504: like the reference, divide the outputs that feed the residual stream by
        # 2^(layer // 6) in the weights and multiply back in fp32 (exact in powers of two).
        scales = [float(2 ** (i // 6)) if dtype == torch.float16 else 1.0 for i in range(cfg.n_layer)]
        self.params = p  # the (possibly rescaled) tensors by checkpoint name
        for i, sc in enumerate(scales):
            if sc != 1.0:
                for n in ("att.output.weight", "ffn.value.weight"):
                    p[f"blocks.{i}.{n}"] = p[f"blocks.{i}.{n}"] / sc
        # ln0 acts on the embedding alone, so for inference it is applied once to the whole table (as the reference
        # does). The table stays in host memory like the reference's: a step only gathers B x T rows, and a 24 GB GPU
        # holding a 12B fp16 model has no room for another 0.7 GB (nor for the fp32 temporary of the norm).
        if trainable:
            self.emb = p["emb.weight"]
        else:
            ln0 = [p[f"blocks.0.ln0.{n}"].cpu() for n in ("weight", "bias")]
            self.emb = F.layer_norm(p["emb.weight"].float(), (cfg.n_embd,), *ln0)
            if self.device.type != "cpu":
                self.emb = self.emb.to(dtype)
        self.ln0 = (p["blocks.0.ln0.weight"], p["blocks.0.ln0.bias"])
        self.ln1 = [(p[f"blocks.{i}.ln1.weight"], p[f"blocks.{i}.ln1.bias"]) for i in range(cfg.n_layer)]
        self.ln2 = [(p[f"blocks.{i}.ln2.weight"], p[f"blocks.{i}.ln2.bias"]) for i in range(cfg.n_layer)]
        kernel = "torch" if trainable else kernel
        self.att, self.ffn = [], []
        for i in range(cfg.n_layer):
            self.att.append(TimeMix(p, i, cfg, scales[i], kernel))
            self.ffn.append(ChannelMix(p, i, scales[i], kernel))
            if not trainable:  # block i's matrices now live (packed) in its Linears: drop converted copies as we go,
                self._drop_matrices(p, f"blocks.{i}.")  # so that bf16-from-fp32 never holds two full copies
        self.ln_out = (p["ln_out.weight"], p["ln_out.bias"])
        self.head = Linear(p["head.weight"], kernel)  # (V, D)
        self.kernel = self.head.kernel
        # With the native CPU kernels each block runs as one call (cpu_kernels.cpp, block), decode steps and prefill
        # chunks alike: the same arithmetic as _block below, without the per-op dispatch that is ~25% of a bf16
        # decode step at D=768, nor the torch path's allocations and chunked WKV (~40% of a 31 x 19 prefill at D=384).
        self._native_blocks = ([self._native_block_params(i) for i in range(cfg.n_layer)]
                               if self.kernel in ("native", "dual") else None)
        # With "dual", calls of this many rows (sessions x tokens) or more multiply through oneDNN inside the native
        # block, as a dual Linear does (worker/linear.py): large batches and prefill chunks on such CPUs.
        self._native_onednn = [[lin.onednn for lin in (*self.att[i].rkvg, self.att[i].output, self.ffn[i].key,
                                                        self.ffn[i].value, self.ffn[i].receptance)]
                               for i in range(cfg.n_layer)] if self.kernel == "dual" else None
        self._onednn_from_rows = self.head.onednn_from_rows or 0
        if not trainable:  # the matrices now live in the Linears and self.emb: let go of the file's mapped views
            self._drop_matrices(p, "")
        self.grad_checkpoint = False  # trainable only: recompute each block in backward to save activation memory

    @staticmethod
    def _drop_matrices(p: dict[str, torch.Tensor], prefix: str) -> None:
        for name in [k for k, v in p.items() if k.startswith(prefix) and v.dim() >= 2 and "time_" not in k]:
            del p[name]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, trainable: bool = False, kernel: str = "auto") -> RWKV5:
        """Load an official BlinkDL RWKV-5.2 `.pth` (fp32/fp16/bf16) without holding two full copies in RAM."""
        params = read_checkpoint(path)
        if trainable:  # own, writable fp32 copies (not views of the read-only mapping)
            params = {k: v.to(device=device, dtype=torch.float32, copy=True) for k, v in params.items()}
        return cls(params, device=device, dtype=dtype, trainable=trainable, kernel=kernel)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their official names and shapes (a trainable model's current values), for saving."""
        if not self.trainable:
            raise RuntimeError("state_dict() is for trainable models (inference weights may be packed or rescaled)")
        return {k: v.detach().clone() for k, v in self.params.items()}

    def init_state(self, batch_size: int = 1) -> State:
        """The zero state of `batch_size` fresh sessions."""
        c = self.config
        z = lambda *shape: torch.zeros(*shape, device=self.device, dtype=torch.float32)  # noqa: E731
        return State(z(c.n_layer, batch_size, c.n_embd), z(c.n_layer, batch_size, c.n_head, c.head_size, c.head_size),
                     z(c.n_layer, batch_size, c.n_embd))

    def forward(self, tokens: torch.Tensor, state: State, *, all_logits: bool = False,
                out: State | None = None) -> tuple[torch.Tensor, State]:
        """Run B sessions over T tokens each. tokens: (B, T) int64; returns fp32 logits (B, V), or (B, T, V) with
        `all_logits`, and the new state (the input state is not modified). A trainable model records autograd.

        `out`: a state of the same shapes to write the new state into (and return). A batch of 32 sessions has
        ~80 MB of state at D=768; a fresh buffer every step costs ~20 ms of page faults, so a decode loop keeps two
        buffers and alternates (see worker/engine/batch.py)."""
        if out is not None and (out is state
                                or any(o.shape != t.shape for o, t in zip(out.tensors(), state.tensors()))):
            raise ValueError("out must be a distinct state of the same shapes as state")
        if self.trainable:
            return self._forward(tokens, state, all_logits, None)
        with torch.inference_mode():
            return self._forward(tokens, state, all_logits, out)

    def _forward(self, tokens: torch.Tensor, state: State, all_logits: bool,
                 out: State | None) -> tuple[torch.Tensor, State]:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sessions, tokens {B}")
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        D = self.config.n_embd
        x = self.emb[tokens.to(self.emb.device)].to(self.device, torch.float32)  # (B, T, D) residual stream, fp32
        if self.trainable:
            for m in (*self.att, *self.ffn):
                m.refresh()
            x = F.layer_norm(x, (D,), *self.ln0)
            x, new = self._blocks_autograd(x, state)
        else:
            new = out or State(*(torch.empty_like(t) for t in state.tensors()))  # written layer by layer, no stacking
            for i in range(self.config.n_layer):
                x, *_ = self._block(i, x, state, new)
        if not all_logits:
            x = x[:, -1:]
        x = F.layer_norm(x, (D,), *self.ln_out)
        logits = self.head(x)  # (B, T', V)
        return (logits if all_logits else logits[:, 0]), new

    def _native_block_params(self, i: int) -> list[torch.Tensor]:
        """Block i's tensors in the order the native block reads them."""
        att, ffn = self.att[i], self.ffn[i]
        ln_x = [att.p[att.a + f"ln_x.{n}"].contiguous() for n in ("weight", "bias")]
        return [*self.ln1[i], att.mix.contiguous(), *(lin.packed for lin in att.rkvg), att.w.contiguous(),
                att.u.contiguous(), *ln_x, att.output.packed, *self.ln2[i], ffn.mix_k, ffn.mix_r,
                ffn.key.packed, ffn.value.packed, ffn.receptance.packed]

    def _block(self, i: int, x, state: State, new: State | None = None):
        """Block i: x += time mixing, x += channel mixing; returns x and the block's new (shift, wkv, shift)."""
        if self._native_blocks is not None and new is not None:
            x = cpu_kernels.block(x, self._native_blocks[i], self._native_onednn[i] if self._native_onednn else [],
                                  self._onednn_from_rows, state.att_shift[i], state.wkv[i], state.ffn_shift[i],
                                  new.att_shift[i], new.wkv[i], new.ffn_shift[i], self.att[i].scale)
            return x, new.att_shift[i], new.wkv[i], new.ffn_shift[i]
        D = self.config.n_embd
        xx = F.layer_norm(x, (D,), *self.ln1[i])
        dx, att_shift, wkv = self.att[i](xx, state.att_shift[i], state.wkv[i], None if new is None else new.wkv[i])
        x = x + dx
        xx = F.layer_norm(x, (D,), *self.ln2[i])
        dx, ffn_shift = self.ffn[i](xx, state.ffn_shift[i])
        if new is not None:
            new.att_shift[i].copy_(att_shift)
            new.ffn_shift[i].copy_(ffn_shift)
        return x + dx, att_shift, wkv, ffn_shift

    def _blocks_autograd(self, x, state: State):
        """The blocks without in-place writes, optionally checkpointed, so gradients reach weights and state."""
        outs = []
        for i in range(self.config.n_layer):
            if self.grad_checkpoint and torch.is_grad_enabled():
                x, *o = torch.utils.checkpoint.checkpoint(self._block, i, x, state, use_reentrant=False)
            else:
                x, *o = self._block(i, x, state)
            outs.append(o)
        return x, State(*(torch.stack(t) for t in zip(*outs)))

    __call__ = forward


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------------------------

_REQUIRED_BLOCK_KEYS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_mix_g", "att.time_decay", "att.time_faaaa",
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.gate.weight", "att.output.weight",
    "att.ln_x.weight", "att.ln_x.bias",
    "ffn.time_mix_k", "ffn.time_mix_r", "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight",
)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth` file, memory-mapped where the format allows (zip-based torch.save files)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        mmap = zipfile.is_zipfile(path)
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles and tars fail in many ways; one message
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): {type(e).__name__}: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return sd


def detect_architecture(params: dict[str, torch.Tensor]) -> str:
    """Name the RWKV generation a state dict belongs to: 'v5.2', or what else it is."""
    keys = set(params)
    if any(".att.r_k" in k or ".att.x_r" in k or ".att.w0" in k for k in keys):
        return "RWKV-7"
    if any(".time_maa" in k for k in keys):
        return "RWKV-6"
    if not any(".att.ln_x." in k for k in keys):
        return "RWKV-4" if any(".att.time_first" in k for k in keys) else "unknown (no blocks.N.att.ln_x)"
    if not any(".att.gate." in k for k in keys):
        return "RWKV-5.0"
    decay = params.get("blocks.0.att.time_decay")
    if decay is None:
        return "unknown (no blocks.0.att.time_decay)"
    if decay.dim() < 2 or decay.shape[-1] == 1:
        return "RWKV-5.1"
    return "v5.2"


def config_from_params(params: dict[str, torch.Tensor]) -> RWKV5Config:
    """Read the model's shapes from its weights, refusing anything that is not a complete RWKV-5.2 model."""
    arch = detect_architecture(params)
    if arch != "v5.2":
        raise CheckpointError(
            f"not an RWKV-5.2 checkpoint: found {arch} ({len(params)} tensors, e.g. {sorted(params)[:3]})")
    layers = {int(m.group(1)) for k in params if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    for name in ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias",
                 "head.weight"):
        if name not in params:
            raise CheckpointError(f"RWKV-5.2 checkpoint is missing {name}")
    for i in range(n_layer):
        for k in _REQUIRED_BLOCK_KEYS:
            if f"blocks.{i}.{k}" not in params:
                raise CheckpointError(f"RWKV-5.2 checkpoint is missing blocks.{i}.{k} (it has {n_layer} layers)")
    vocab_size, n_embd = params["emb.weight"].shape
    n_head, head_size = params["blocks.0.att.time_decay"].shape
    cfg = RWKV5Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_size=head_size,
                      ffn_size=params["blocks.0.ffn.key.weight"].shape[0], vocab_size=vocab_size)
    if n_head * head_size != n_embd:
        raise CheckpointError(f"time_decay is {n_head}x{head_size} but n_embd is {n_embd}")
    if tuple(params["head.weight"].shape) != (vocab_size, n_embd):
        raise CheckpointError(f"head.weight is {tuple(params['head.weight'].shape)}, expected {(vocab_size, n_embd)}")
    for i in range(n_layer):
        for k, shape in ((f"att.{n}.weight", (n_embd, n_embd))
                         for n in ("receptance", "key", "value", "gate", "output")):
            if tuple(params[f"blocks.{i}.{k}"].shape) != shape:
                raise CheckpointError(
                    f"blocks.{i}.{k} has shape {tuple(params[f'blocks.{i}.{k}'].shape)}, expected {shape}")
    return cfg


def weights_fingerprint(params: dict[str, torch.Tensor], samples: int = 1024) -> bytes:
    """32 bytes that identify a model: every tensor's name and shape, and a strided sample of its values in fp32.

    Sampling (not hashing all 23 GB of a 12B model) keeps loading fast; any two real models differ in the sample."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name]
        h.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step][:samples].float().contiguous().numpy().tobytes())
    return h.digest()


def logits_scale(logits: torch.Tensor) -> float:
    """A scale for comparing logits: their RMS (>= 1e-6)."""
    return max(float(logits.float().pow(2).mean().sqrt()), 1e-6)


__all__ = ["RWKV5", "RWKV5Config", "CheckpointError", "read_checkpoint", "config_from_params", "wkv_step",
           "wkv_chunked", "weights_fingerprint"]
