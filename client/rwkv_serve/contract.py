"""The wire contract beyond the protos: metadata keys, limits, why a turn ends, and the sampling fields.

Shared by the SDK and the server's core (both import it; it needs protobuf only), so the two sides cannot drift.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from rwkv_serve.v1 import common_pb2

# ---- metadata keys ------------------------------------------------------------------------------------------
API_KEY_HEADER = "authorization"  # "Bearer <key>", the usual gRPC convention (the SDK sends this one)
# What the front accepts: "authorization: Bearer <key>" or "x-api-key: <key>".
API_KEY_HEADERS = (API_KEY_HEADER, "x-api-key")
ERROR_KEY = "rwkv-error"  # trailing metadata: the domain exception's class name, so a caller can rebuild it exactly
RETRY_AFTER_KEY = "retry-after-ms"  # trailing metadata on RESOURCE_EXHAUSTED / UNAVAILABLE: when to retry

# ---- limits that both sides know ----------------------------------------------------------------------------
MAX_LOGPROBS = 20  # most alternatives per token a turn may ask for (Sampling.logprobs)


class StopReason(enum.IntEnum):
    """Why a turn ended (the values are the wire's common.StopReason)."""

    UNSPECIFIED = common_pb2.STOP_REASON_UNSPECIFIED
    STOP_TOKEN = common_pb2.STOP_REASON_STOP_TOKEN
    STOP_STRING = common_pb2.STOP_REASON_STOP_STRING
    MAX_TOKENS = common_pb2.STOP_REASON_MAX_TOKENS
    CANCELLED = common_pb2.STOP_REASON_CANCELLED
    CONSTRAINT_COMPLETE = common_pb2.STOP_REASON_CONSTRAINT_COMPLETE

    @property
    def label(self) -> str:
        """"stop_token", "max_tokens", ...: for logs, spans and metrics."""
        return self.name.lower()


# ---- sampling -----------------------------------------------------------------------------------------------
# The fields of common.Sampling: name -> kind of value. The one list: the SDK's keyword arguments, the front's
# stored session defaults and the worker's SamplingParams are all checked against it (tests/test_layout.py).
SAMPLING_FIELDS: dict[str, str] = {
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "penalty_decay": "float",
    "banned_tokens": "tokens",
    "stop_token_ids": "tokens",
    "stop_strings": "strings",
    "max_tokens": "int",
    "seed": "int",
    "logprobs": "int",
}


def sampling_to_pb(fields: Mapping[str, Any] | None) -> common_pb2.Sampling:
    """A Sampling message with exactly the given fields set (None values stay unset: they inherit).

    TypeError names unknown fields; ValueError/TypeError from protobuf when a value has the wrong type."""
    pb = common_pb2.Sampling()
    unknown = set(fields or ()) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    for name, value in (fields or {}).items():
        if value is None:
            continue
        kind = SAMPLING_FIELDS[name]
        if kind == "tokens":
            getattr(pb, name).ids.extend(int(v) for v in value)
        elif kind == "strings":
            getattr(pb, name).values.extend([value] if isinstance(value, str) else [str(v) for v in value])
        else:
            setattr(pb, name, float(value) if kind == "float" else int(value))
    return pb


def sampling_from_pb(pb: common_pb2.Sampling) -> dict[str, Any]:
    """The fields set in a Sampling message, as a dict ("unset" stays distinct from 0 through every layer)."""
    out: dict[str, Any] = {}
    for name, kind in SAMPLING_FIELDS.items():
        if not pb.HasField(name):
            continue
        value = getattr(pb, name)
        if kind == "tokens":
            out[name] = list(value.ids)
        elif kind == "strings":
            out[name] = list(value.values)
        elif kind == "float":  # float32 on the wire: 0.3 arrives as 0.30000001192...; keep what the caller wrote
            out[name] = float(f"{value:.7g}")
        else:
            out[name] = value
    return out
