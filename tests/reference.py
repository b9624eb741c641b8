"""The `rwkv` PyPI package (BlinkDL's reference implementation) as a test oracle."""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch


def reference_model(path: str | Path, strategy: str = "cpu fp32"):
    """Load a checkpoint in the reference package (its JIT and CUDA kernel off, its chatter silenced)."""
    # The reference reads these at import time; set them before the first import.
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    from rwkv.model import RWKV  # noqa: PLC0415 - import after the environment is set

    path = str(path)
    with contextlib.redirect_stdout(io.StringIO()):
        return RWKV(path[:-4] if path.endswith(".pth") else path, strategy=strategy)


def reference_run(ref, tokens: list[int], state=None, *, chunk: int | None = None):
    """Feed tokens to the reference model (as one sequence, or in chunks); returns (logits of the last, state)."""
    chunk = chunk or len(tokens)
    logits = None
    for i in range(0, len(tokens), chunk):
        logits, state = ref.forward(tokens[i : i + chunk], state)
    return logits.float(), state


def reference_wkv(state, layer: int) -> torch.Tensor:
    """The reference's WKV matrix of one layer, [H, key, value]."""
    return state[layer * 3 + 1]
