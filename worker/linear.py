"""How the model multiplies by its weights: the packed Linear, and which kernel it uses (native, oneDNN, torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker import cpu_kernels

KERNELS = ("auto", "native", "onednn", "dual", "torch")  # how a CPU model multiplies by its weights (see Linear)

# From how many rows (tokens in one call: batch x positions) oneDNN's GEMM beats the native kernels, where it does:
# measured on an AMD EPYC with AVX-512 + AVX512_BF16 (docs/benchmarks.md, "CPU kernel choice"). bf16 needs the
# CPU's bf16 dot products; fp32 needs AVX-512. Below these, and on AVX2-only CPUs, the native kernels win.
ONEDNN_FROM_ROWS = {torch.bfloat16: 8, torch.float32: 32}
_ONEDNN_FAST_ON = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float32: {"avx512f"}}


def dual_helps(dtype: torch.dtype, flags: set[str] | None = None) -> bool:
    """The rule behind "auto": whether a CPU with these feature flags runs `dtype` GEMMs of ONEDNN_FROM_ROWS rows
    or more faster with oneDNN than with the native kernels (then "auto" holds both and picks per call)."""
    flags = cpu_kernels.cpu_flags() if flags is None else flags
    return bool(_ONEDNN_FAST_ON.get(dtype, set()) & flags)


class Linear:
    """y = x W^T, returned in fp32. On CPU the weight is repacked once for the kernel chosen (`kernel`):
    - "native": worker/csrc/cpu_kernels.cpp (AVX2+FMA, fp32/bf16/fp16 weights, fp32 x and accumulation). It reads the
      weights at ~90% of the memory bandwidth for one token and runs bf16 GEMMs ~6x faster than torch here;
    - "onednn": oneDNN's prepacked linear (fp32; bf16 only where the CPU has AVX512-BF16);
    - "dual": both packs (twice the weight memory), native below `onednn_from_rows` rows per call, oneDNN from
      there: on CPUs where oneDNN's GEMM is faster for large batches and prefill (see `dual_helps`);
    - "torch": plain `F.linear` (GPUs, training, and anything the others cannot take).
    "auto" picks dual where the rule says it helps, else native, else oneDNN, else torch (the first that works)."""

    def __init__(self, weight: torch.Tensor, kernel: str = "auto"):  # (out, in), nn.Linear layout as in the checkpoint
        self.dtype, self.shape = weight.dtype, tuple(weight.shape)
        self.kernel = choose_kernel(weight, kernel)
        self.weight = None  # whichever copy the kernel needs replaces the checkpoint's: one copy of the weights in RAM
        self.packed = self.onednn = None  # the native kernels' panels, oneDNN's blocked weight
        # Calls of this many rows or more go to oneDNN (dual only; never for the others)
        self.onednn_from_rows = ONEDNN_FROM_ROWS.get(self.dtype, 1) if self.kernel == "dual" else None
        if self.kernel in ("native", "dual"):
            self.packed = cpu_kernels.pack(weight)  # (O/16, in, 16)
            self.native = cpu_kernels.linear_op()  # called directly: this is ~100 calls per decode step
        if self.kernel in ("onednn", "dual"):
            self.onednn = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        if self.kernel == "torch":
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.onednn is None or x.numel() < self.onednn_from_rows * self.shape[1]):
            return self.native(x, self.packed, self.shape[0])  # takes (..., in) fp32 as it is
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.onednn is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.onednn, None, "none", [], "")
        else:
            y = F.linear(x.to(self.dtype), self.weight)
        return y.float().view(*lead, self.shape[0])


def choose_kernel(weight: torch.Tensor, requested: str = "auto") -> str:
    """The kernel a Linear over `weight` uses: `requested` when it can run here, else the next in Linear's order."""
    if requested not in KERNELS:
        raise ValueError(f"unknown kernel {requested!r}; expected one of {KERNELS}")
    if weight.device.type != "cpu" or requested == "torch":
        return "torch"
    if requested in ("auto", "native", "dual") and weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if cpu_kernels.available():
            if requested == "dual" or (requested == "auto" and dual_helps(weight.dtype)):
                if weight.dtype in ONEDNN_FROM_ROWS and _onednn_ok(weight.dtype):
                    return "dual"
                if requested == "dual":
                    raise RuntimeError(f"oneDNN cannot run {weight.dtype} here: no dual kernel")
            return "native"
        if requested in ("native", "dual"):
            raise RuntimeError(f"native CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    if weight.dtype in (torch.float32, torch.bfloat16) and _onednn_ok(weight.dtype):
        return "onednn"
    return "torch"


_ONEDNN: dict[torch.dtype, bool] = {}


def _onednn_ok(dtype: torch.dtype) -> bool:
    """Whether this torch build's oneDNN linear runs and agrees with F.linear for `dtype` (checked once)."""
    if dtype not in _ONEDNN:
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(96, 64, generator=g).to(dtype), torch.randn(3, 64, generator=g).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _ONEDNN[dtype] = bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2))
        except (RuntimeError, AttributeError):
            _ONEDNN[dtype] = False
    return _ONEDNN[dtype]
