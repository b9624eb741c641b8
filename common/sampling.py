"""The one validator of sampling parameters (the fields are rwkv_serve.contract.SAMPLING_FIELDS).

The front runs it on a session's defaults and a turn's overrides before anything is stored or routed (a bad
default fails at CreateSession, not at turn 1); the worker runs it again on the merged parameters, with its
vocabulary size and its max_tokens limit (worker.sampler.SamplingParams.validate).

A response_format is checked here for its shape only (one kind, a non-empty text within the size limit, a
json_schema that parses as JSON): compiling it needs the worker's vocabulary (worker/constraints.py), so a
schema or grammar the compiler rejects fails at the worker, as INVALID_ARGUMENT with the compiler's message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument
from rwkv_serve.contract import MAX_LOGPROBS, MAX_RESPONSE_FORMAT_BYTES, RESPONSE_FORMAT_KINDS, SAMPLING_FIELDS

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


def check_response_format(value: Any, max_bytes: int = MAX_RESPONSE_FORMAT_BYTES) -> tuple[str, str]:
    """(kind, text) of a response_format value {kind: text}; InvalidArgument when its shape is wrong."""
    if not isinstance(value, Mapping) or len(value) != 1:
        raise InvalidArgument(f"response_format must set exactly one of {', '.join(RESPONSE_FORMAT_KINDS)}")
    ((kind, text),) = value.items()
    if kind not in RESPONSE_FORMAT_KINDS:
        raise InvalidArgument(f"unknown response_format kind {kind!r} "
                              f"(expected one of {', '.join(RESPONSE_FORMAT_KINDS)})")
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f"response_format {kind} must be a non-empty string")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument(f"response_format {kind} is {size} bytes; the limit is {max_bytes}")
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"response_format json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument("response_format json_schema must be a JSON object (or true/false), "
                                  f"got {type(schema).__name__}")
    return kind, text


def check_sampling(fields: Mapping[str, Any], *, vocab_size: int | None = None,
                   max_tokens_limit: int | None = None,
                   max_format_bytes: int = MAX_RESPONSE_FORMAT_BYTES) -> None:
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
        elif kind == "format":
            check_response_format(value, max_format_bytes)
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
