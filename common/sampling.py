"""The one validator of sampling parameters (the fields are rwkv_serve.contract.SAMPLING_FIELDS).

The front runs it on a session's defaults and a turn's overrides before anything is stored or routed (a bad
default fails at CreateSession, not at turn 1); the worker runs it again on the merged parameters, with its
vocabulary size and its max_tokens limit (worker.sampler.SamplingParams.validate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument
from rwkv_serve.contract import MAX_LOGPROBS, SAMPLING_FIELDS

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes an unsigned 64-bit seed

# Ranges of the numeric fields: (low, high, low inclusive, high inclusive, what to say).
_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "temperature": (0, math.inf, True, True, ">= 0 (0 = greedy)"),
    "top_p": (0, 1, False, True, "in (0, 1]"),
    "top_k": (0, math.inf, True, True, ">= 0 (0 = off)"),
    "penalty_decay": (0, 1, True, True, "in [0, 1]"),
    "max_tokens": (1, math.inf, True, True, ">= 1"),
    "seed": (0, SEED_LIMIT, True, False, "an integer in [0, 2**64)"),
}


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def check_sampling(fields: Mapping[str, Any], *, vocab_size: int | None = None,
                   max_tokens_limit: int | None = None) -> None:
    """Raises InvalidArgument naming the first invalid field of `fields` (the set ones; None = unset)."""
    for name, value in fields.items():
        kind = SAMPLING_FIELDS.get(name)
        if kind is None:
            raise InvalidArgument(f"unknown sampling field {name!r}")
        if value is None:
            continue
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgument(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"{name} must be an integer, got {value!r}")
        elif kind == "tokens":
            for token_id in value:
                if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0 \
                        or (vocab_size and token_id >= vocab_size):
                    raise InvalidArgument(f"{name} contains {token_id!r}, not a token id in "
                                          f"[0, {vocab_size or 'vocab size'})")
        elif kind == "strings":
            for text in value:
                if not isinstance(text, str) or not text:
                    raise InvalidArgument(f"stop_strings must be non-empty strings, got {text!r}")
        if name in _RANGES and not _in_range(value, *_RANGES[name][:4]):
            raise InvalidArgument(f"{name} must be {_RANGES[name][4]}, got {value!r}")
    max_tokens = fields.get("max_tokens")
    if max_tokens_limit is not None and max_tokens is not None and max_tokens > max_tokens_limit:
        raise InvalidArgument(f"max_tokens must be <= {max_tokens_limit}, got {max_tokens}")
    logprobs = fields.get("logprobs")
    top = min(MAX_LOGPROBS, vocab_size) if vocab_size else MAX_LOGPROBS
    if logprobs is not None and not 0 <= logprobs <= top:
        raise InvalidArgument(f"logprobs must be in [0, {top}], got {logprobs}")
    if vocab_size and len(set(fields.get("banned_tokens") or ())) >= vocab_size:
        raise InvalidArgument("banned_tokens bans the whole vocabulary")
