"""The wire contract beyond the protos: metadata keys, limits, why a turn ends, and the sampling fields.

Shared by the SDK and the server's core (both import it; it needs protobuf only), so the two sides cannot drift.
"""

from __future__ import annotations

import enum
import json
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
# Sampling.response_format: its kinds (the oneof's fields) and the largest text the front accepts for one (a
# worker may set a lower limit of its own: RWKV_WORKER_CONSTRAINT_MAX_BYTES).
RESPONSE_FORMAT_KINDS = ("json_schema", "regex", "lark_grammar")
MAX_RESPONSE_FORMAT_BYTES = 64 * 1024


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
    # {"json_schema": schema} | {"regex": pattern} | {"lark_grammar": grammar}: exactly one key; a json_schema
    # may be given as a dict (sent as its JSON text) and always comes back as text.
    "response_format": "format",
}


def response_format_to_pb(value: Mapping[str, Any]) -> common_pb2.ResponseFormat:
    """A ResponseFormat message from {kind: text} (a json_schema dict/list/bool is serialized as JSON)."""
    if not isinstance(value, Mapping) or len(value) != 1:
        raise TypeError("response_format must be one of {'json_schema': ...}, {'regex': ...}, "
                        f"{{'lark_grammar': ...}}, got {value!r}")
    ((kind, text),) = value.items()
    if kind not in RESPONSE_FORMAT_KINDS:
        raise TypeError(f"unknown response_format kind {kind!r} (expected one of {', '.join(RESPONSE_FORMAT_KINDS)})")
    if kind == "json_schema" and not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False)  # key order kept: it is the order the model writes them in
    if not isinstance(text, str):
        raise TypeError(f"response_format {kind} must be a string, got {type(text).__name__}")
    return common_pb2.ResponseFormat(**{kind: text})


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
        elif kind == "format":
            getattr(pb, name).CopyFrom(response_format_to_pb(value))
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
        elif kind == "format":  # a message with none of its oneof set reads back as {}: the validator names it
            which = value.WhichOneof("format")
            out[name] = {which: getattr(value, which)} if which else {}
        elif kind == "float":  # float32 on the wire: 0.3 arrives as 0.30000001192...; keep what the caller wrote
            out[name] = float(f"{value:.7g}")
        else:
            out[name] = value
    return out
