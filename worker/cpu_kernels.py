"""Native CPU kernels of the engine (worker/csrc/cpu_kernels.cpp) and of the sampler (topk.cpp): built once with
the system compiler, then cached."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NR = 16  # output features per packed panel (see cpu_kernels.cpp)
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("cpu_kernels.cpp", "topk.cpp")]
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-fopenmp"]
_loaded: bool | None = None
_why_not = ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (avx2, fma, avx512_bf16, ...); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_prerequisite() -> str:
    """What this machine lacks to build the kernels ('' when nothing): the CPU extensions, or a C++ compiler."""
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        return "the CPU lacks AVX2/FMA/F16C"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return ""


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on first call: ~20 s, then cached)."""
    global _loaded, _why_not
    if _loaded is None:
        _why_not = missing_prerequisite()
        if not _why_not:
            try:
                _build()
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback", said once
                _why_not = f"build failed: {type(e).__name__}: {str(e)[-400:]}"
        _loaded = not _why_not
        if not _loaded:
            log.warning("native CPU kernels unavailable (%s); using oneDNN / F.linear", _why_not)
    return _loaded


def why_unavailable() -> str:
    return _why_not


def _build() -> None:
    """Load the kernels from a build directory keyed by everything that affects the binary, building them there
    first if needed. A built library is loaded directly: torch's loader takes a lock file on every load, and a
    process killed while holding it (a worker SIGKILLed at start) would leave every later start waiting forever."""
    parts = [*(src.read_bytes() for src in _SOURCES), " ".join(_CFLAGS).encode(), torch.__version__.encode(),
             sys.version.encode(), platform.machine().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build_dir = root / f"rwkv_cpu_kernels-{key}"
    library, lock = build_dir / "rwkv_cpu_kernels.so", build_dir / "lock"
    if not library.exists() or lock.exists():  # not built, or another process is building it now
        from torch.utils import cpp_extension

        try:  # the `ninja` wheel, when the venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        build_dir.mkdir(parents=True, exist_ok=True)
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:  # left by a build that was killed
            lock.unlink(missing_ok=True)
        cpp_extension.load(name="rwkv_cpu_kernels", sources=[str(src) for src in _SOURCES],
                           build_directory=str(build_dir), is_python_module=False, verbose=False,
                           extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"])
    else:
        torch.ops.load_library(str(library))


_BF16_ORDER = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(O, K) fp32/bf16/fp16 -> (ceil(O/16), K, 16) panels of 16 output rows, zero-padded."""
    O, K = weight.shape
    P = -(-O // NR)
    w = weight
    if P * NR != O:
        w = torch.cat([w, w.new_zeros(P * NR - O, K)])
    w = w.view(P, NR, K)
    if weight.dtype == torch.bfloat16:
        w = w[:, _BF16_ORDER]
    return w.transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x (..., K) fp32 -> (..., out_features) fp32."""
    return torch.ops.rwkv_cpu.linear.default(x, packed, out_features)


def linear_op():
    """The op itself, for callers that make many calls (skips two attribute lookups per call)."""
    return torch.ops.rwkv_cpu.linear.default


def wkv_step(r, k, v, w, u, s, out) -> torch.Tensor:
    """The fused WKV step: y (B, H, N); the new state is written into `out` (which may be `s`)."""
    return torch.ops.rwkv_cpu.wkv_step(r.contiguous(), k.contiguous(), v.contiguous(), w, u, s, out)


def block(x, params, onednn, onednn_from_rows: int, att_shift, wkv, ffn_shift, new_att_shift, new_wkv, new_ffn_shift,
          scale: float):
    """One block over x (B, T, D): T tokens of each of the B sessions (see cpu_kernels.cpp); returns the new x.
    `onednn`: [] or the block's matrices as oneDNN weights, used for calls of `onednn_from_rows` rows or more."""
    return torch.ops.rwkv_cpu.block.default(x, params, onednn, onednn_from_rows, att_shift, wkv, ffn_shift,
                                            new_att_shift, new_wkv, new_ffn_shift, scale)


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest of each row of x (R, n) fp32: value descending, NaN first, ties by
    lower index (torch.topk leaves the order of ties unspecified)."""
    return torch.ops.rwkv_cpu.topk.default(x, k)


def peak_gflops(iterations: int = 20_000_000) -> float:
    """FMA throughput of all torch threads together, GFLOP/s (a roofline for fp32 compute)."""
    return torch.ops.rwkv_cpu.peak_gflops(iterations)


if __name__ == "__main__":  # build ahead of time (scripts/setup.sh) and say whether it worked
    logging.basicConfig(level=logging.INFO)
    ok = available()
    print("native CPU kernels:", "ready" if ok else f"unavailable ({_why_not})")
    sys.exit(0)
