"""How the model multiplies by its weights: the packed Linear, and which kernel it uses (native, oneDNN, torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worker import cpu_kernels

KERNELS = ("auto", "native", "onednn", "torch")  # how a CPU model multiplies by its weights (see Linear)


class Linear:
    """y = x W^T, returned in fp32. On CPU the weight is repacked once for the kernel chosen (`kernel`):
    - "native": worker/csrc/cpu_kernels.cpp (AVX2+FMA, fp32/bf16/fp16 weights, fp32 x and accumulation). It reads the
      weights at ~90% of the memory bandwidth for one token and runs bf16 GEMMs ~6x faster than torch here;
    - "onednn": oneDNN's prepacked linear (fp32; bf16 only where the CPU has AVX512-BF16);
    - "torch": plain `F.linear` (GPUs, training, and anything the others cannot take).
    "auto" picks the first that works, in that order."""

    def __init__(self, weight: torch.Tensor, kernel: str = "auto"):  # (out, in), nn.Linear layout as in the checkpoint
        self.dtype, self.shape = weight.dtype, tuple(weight.shape)
        self.kernel = choose_kernel(weight, kernel)
        self.weight = None  # whichever copy the kernel needs replaces the checkpoint's: one copy of the weights in RAM
        if self.kernel == "native":
            self.packed = cpu_kernels.pack(weight)  # (O/16, in, 16)
            self.native = cpu_kernels.linear_op()  # called directly: this is ~100 calls per decode step
        elif self.kernel == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        else:
            self.weight, self.packed = weight, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":  # takes (..., in) fp32 as it is
            return self.native(x, self.packed, self.shape[0])
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.kernel == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype).contiguous(), self.packed, None, "none", [], "")
        else:
            y = F.linear(x.to(self.dtype), self.weight)
        return y.float().view(*lead, self.shape[0])


def choose_kernel(weight: torch.Tensor, requested: str = "auto") -> str:
    """The kernel a Linear over `weight` uses: `requested` when it can run here, else the next in Linear's order."""
    if requested not in KERNELS:
        raise ValueError(f"unknown kernel {requested!r}; expected one of {KERNELS}")
    if weight.device.type != "cpu" or requested == "torch":
        return "torch"
    if requested in ("auto", "native") and weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if cpu_kernels.available():
            return "native"
        if requested == "native":
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
